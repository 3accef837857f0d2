import os

SECRET_KEY = "tidemark-test-only"
DEBUG = False
USE_TZ = True
INSTALLED_APPS = ["django.contrib.contenttypes", "django.contrib.auth", "shop"]
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.postgresql",
        "HOST": os.environ["PGHOST"],
        "PORT": os.environ["PGPORT"],
        "USER": "postgres",
        "NAME": "postgres",
        "TEST": {"NAME": os.environ.get("TEST_DB_NAME", "test_tidemark_django")},
    }
}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
