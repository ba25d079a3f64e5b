from django.urls import include, path
from rest_framework.routers import SimpleRouter

from .api import ItemViewSet, ProjectViewSet

router = SimpleRouter()
router.register("projects", ProjectViewSet, basename="project")

items = ItemViewSet.as_view({"get": "list", "post": "create"})
item = ItemViewSet.as_view({"get": "retrieve", "patch": "partial_update", "delete": "destroy"})

urlpatterns = [
    path("api/", include(router.urls)),
    path("api/projects/<int:project_pk>/items/", items, name="project-items"),
    path("api/items/<int:pk>/", item, name="item-detail"),
]
