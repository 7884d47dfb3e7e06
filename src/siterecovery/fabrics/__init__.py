"""Sites that machines live on. Every provider implements `Fabric` from `base`."""

from siterecovery.fabrics.base import Fabric, FabricError, Inventory

__all__ = ["Fabric", "FabricError", "Inventory"]
