from django.urls import path

from mailshop.orders import views

urlpatterns = [
    path("orders/", views.place_order, name="place-order"),
    path("orders/declined/", views.place_order_declined, name="place-order-declined"),
    path("orders/<int:pk>/", views.order_status, name="order-status"),
]
