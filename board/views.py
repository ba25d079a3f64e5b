from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from guardian.shortcuts import get_objects_for_user

from .demo import DEMO_USERS
from .models import Project


def home(request: HttpRequest) -> HttpResponse:
    projects = []
    if request.user.is_authenticated:
        projects = list(
            get_objects_for_user(request.user, "board.view_project", klass=Project)
            .select_related("organization")
            .prefetch_related("items")
        )
    return render(request, "board/home.html", {"projects": projects, "demo_users": DEMO_USERS})
