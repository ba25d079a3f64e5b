from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from guardian.shortcuts import get_objects_for_user

from notifications.models import Notification

from .demo import DEMO_USERS
from .models import Project


def home(request: HttpRequest) -> HttpResponse:
    projects = []
    notifications: list[Notification] = []
    if request.user.is_authenticated:
        notifications = list(Notification.objects.for_user(request.user)[:10])
        projects = list(
            get_objects_for_user(request.user, "board.view_project", klass=Project)
            .select_related("organization")
            .prefetch_related("items")
        )
    return render(
        request,
        "board/home.html",
        {"projects": projects, "notifications": notifications, "demo_users": DEMO_USERS},
    )
