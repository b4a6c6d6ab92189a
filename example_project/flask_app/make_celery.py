"""What ``celery -A make_celery worker`` loads: the Flask app's Celery instance."""

from shop import create_app

flask_app = create_app()
celery_app = flask_app.extensions["celery"]
