"""Stand-in for torchvision in the peers' environment: Dingo uses only transforms.Compose."""
from . import transforms  # noqa: F401
