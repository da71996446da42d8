from django.db import migrations, models


class Migration(migrations.Migration):
    initial = True
    dependencies: list[tuple[str, str]] = []  # noqa: RUF012 - Django's migration format

    operations = [  # noqa: RUF012 - Django's migration format
        migrations.CreateModel(
            name="Order",
            fields=[
                ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False,
                                           verbose_name="ID")),
                ("email", models.CharField(max_length=254)),
                ("item", models.CharField(max_length=200)),
                ("created_at", models.DateTimeField(auto_now_add=True)),
                ("mailworker_id", models.CharField(blank=True, max_length=32)),
                ("mail_state", models.CharField(blank=True, max_length=20)),
            ],
        ),
    ]
