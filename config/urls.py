from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from board import views
from board.demo import DEMO_USERS

urlpatterns = [
    path("", views.home, name="home"),
    path("projects/<int:pk>/", views.project_board, name="project-board"),
    path("dashboard/", views.dashboard, name="dashboard"),
    path("admin/", admin.site.urls),
    # The demo's login page lists the demo users.
    path(
        "accounts/login/",
        auth_views.LoginView.as_view(extra_context={"demo_users": DEMO_USERS}),
        name="login",
    ),
    path("accounts/", include("django.contrib.auth.urls")),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="schema"), name="swagger-ui"),
    path("", include("realtime.urls")),
    path("", include("notifications.urls")),
    path("", include("presence.urls")),
    path("", include("board.urls")),
]
