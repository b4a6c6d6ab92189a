from django.urls import path

from . import views

urlpatterns = [
    path("signup", views.signup, name="signup"),
    path("reports", views.reports, name="reports"),
    path("webhooks", views.webhooks, name="webhooks"),
    path("orders/<int:order_id>/charge", views.charge, name="charge"),
    path("reminders", views.reminders, name="reminders"),
    path("cache/invalidate", views.cache_invalidate, name="cache-invalidate"),
    path("tasks/<str:task_id>", views.task_status, name="task-status"),
    path("queues", views.queues, name="queues"),
    path("activity", views.activity_log, name="activity"),
]
