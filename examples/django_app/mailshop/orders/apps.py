from django.apps import AppConfig


class OrdersConfig(AppConfig):
    name = "mailshop.orders"
    label = "orders"

    def ready(self) -> None:
        from mailshop.orders import receivers  # noqa: F401 - connects the receivers
