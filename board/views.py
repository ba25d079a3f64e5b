from django.contrib.admin.views.decorators import staff_member_required
from django.contrib.auth.decorators import login_required
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import render
from guardian.shortcuts import get_objects_for_user

from notifications.models import Notification
from realtime.models import Event

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


@login_required
def project_board(request: HttpRequest, pk: int) -> HttpResponse:
    """The live board of one project (board/static/board/board.js)."""
    project = Project.objects.select_related("organization").filter(pk=pk).first()
    if project is None or not request.user.has_perm("board.view_project", project):
        raise Http404("No such project.")  # the same for a hidden one
    return render(request, "board/project.html", {"project": project})


@staff_member_required
def dashboard(request: HttpRequest) -> HttpResponse:
    """Staff: the events of every stream they can read, live, with counts by type."""
    projects = get_objects_for_user(request.user, "board.view_project", klass=Project)
    organizations = request.user.organizations.values_list("pk", flat=True)  # type: ignore[union-attr]
    streams = [f"project:{pk}" for pk in projects.values_list("pk", flat=True)]
    streams += [f"tenant:{pk}" for pk in organizations]
    recent = (
        Event.objects.filter(stream__name__in=streams)
        .select_related("stream")
        .order_by("-timestamp", "-pk")[:50]
    )
    return render(request, "board/dashboard.html", {"streams": streams[:100], "recent": recent})
