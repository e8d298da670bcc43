"""Great-circle geometry in torch (losses, offsets, metrics): one haversine for the whole package."""

from __future__ import annotations

import math

import torch

from pipeline.core.gazetteer import EARTH_RADIUS_KM

KM_PER_DEG_LAT = math.pi * EARTH_RADIUS_KM / 180.0  # ≈ 111.2 km


def haversine_km(lat1: torch.Tensor, lon1: torch.Tensor, lat2: torch.Tensor, lon2: torch.Tensor) -> torch.Tensor:
    """Great-circle distance in km between points in degrees; stable for tiny and antipodal distances."""
    return 2.0 * EARTH_RADIUS_KM * torch.asin(torch.sqrt(haversine_term(lat1, lon1, lat2, lon2)).clamp(max=1.0))


def haversine_term(lat1: torch.Tensor, lon1: torch.Tensor, lat2: torch.Tensor, lon2: torch.Tensor) -> torch.Tensor:
    """hav(θ) = sin²(Δφ/2) + cos φ1 cos φ2 sin²(Δλ/2) = (1 − cos θ)/2, accurate for small angles.

    A tiny epsilon keeps sqrt's gradient finite when the points coincide.
    """
    p1, p2 = torch.deg2rad(lat1), torch.deg2rad(lat2)
    dphi = p2 - p1
    dlmb = torch.deg2rad(lon2 - lon1)
    h = torch.sin(dphi / 2) ** 2 + torch.cos(p1) * torch.cos(p2) * torch.sin(dlmb / 2) ** 2
    return h.clamp(min=1e-18, max=1.0)


def unit_xyz(lat: torch.Tensor, lon: torch.Tensor) -> torch.Tensor:
    """Unit vectors (…, 3) of points in degrees."""
    phi, lmb = torch.deg2rad(lat), torch.deg2rad(lon)
    return torch.stack((torch.cos(phi) * torch.cos(lmb), torch.cos(phi) * torch.sin(lmb), torch.sin(phi)), dim=-1)


def xyz_to_latlon(xyz: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x, y, z = xyz.unbind(-1)
    return torch.rad2deg(torch.atan2(z, torch.sqrt(x * x + y * y))), torch.rad2deg(torch.atan2(y, x))


def km_to_deg(radius_km: torch.Tensor, lat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A distance in km as (Δlat, Δlon) in degrees at latitude ``lat``."""
    dlat = radius_km / KM_PER_DEG_LAT
    return dlat, dlat / torch.cos(torch.deg2rad(lat)).clamp(min=1e-3)
