from django.contrib import admin
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from board import views

urlpatterns = [
    path("", views.home, name="home"),
    path("projects/<int:pk>/", views.project_board, name="project-board"),
    path("dashboard/", views.dashboard, name="dashboard"),
    path("admin/", admin.site.urls),
    path("accounts/", include("django.contrib.auth.urls")),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="schema"), name="swagger-ui"),
    path("", include("realtime.urls")),
    path("", include("notifications.urls")),
    path("", include("presence.urls")),
    path("", include("board.urls")),
]
