"""Redshift augmentation of real supernovae (after avocado, Boone 2019): a well-observed nearby supernova moved to a
higher redshift, dimmer and time-dilated, with ZTF's noise and detection threshold, is a new, realistic light curve
of the same class. It multiplies the few hundred real SN II the project has.

For one real curve at spectroscopic redshift ``z`` (known for training objects only; never a model input):

1. The new redshift ``z'`` is drawn so that the new peak magnitude is uniform between the observed peak and
   ``max_peak_mag`` (fainter objects would leave too few detections).
2. Fluxes dim by ``10**(-0.4 (mu(z') - mu(z)))`` (``mu``: the simulator's flat ΛCDM distance modulus); times after the
   first detection stretch by ``(1 + z') / (1 + z)`` (time dilation). No K-correction: the colour is kept, a
   fair approximation for the small redshift changes that keep a BTS supernova detectable (z' below ~0.2).
3. Noise: each point's error becomes ZTF's error at its new magnitude (:func:`deeprubin.sources.simulate
   .sigma_mag_model`, PRIORS' fit), and noise is added so that the total equals that error (the original noise,
   dimmed with the flux, is part of it).
4. Only points at least 5 σ from zero stay (the alert stream's detections); a curve left with fewer than
   ``min_points`` is dropped.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from deeprubin.lightcurves.tensorize import Curve
from deeprubin.schema import flux_to_mag
from deeprubin.sources.simulate import DETECTION_SIGMA, distance_modulus, sigma_mag_model

_Z_GRID = np.linspace(1e-4, 1.0, 4000)
_MU_GRID = distance_modulus(_Z_GRID)


def redshift_for_modulus(mu: np.ndarray | float) -> np.ndarray:
    """The redshift whose distance modulus is ``mu`` (inverse of the monotonic mu(z) on 0 < z <= 1)."""
    return np.interp(mu, _MU_GRID, _Z_GRID)


def redshifted(curve: Curve, z: float, rng: np.random.Generator, max_peak_mag: float = 20.0,
               min_points: int = 5, oid: str | None = None) -> Curve | None:
    """``curve`` (a supernova at redshift ``z``) as seen from a random larger redshift (module docstring), or None
    when it cannot be moved (no valid redshift, too faint already) or too few detections are left."""
    if not (np.isfinite(z) and 0 < z < 0.9) or len(curve.flux) < min_points:
        return None
    peak_flux = float(np.max(curve.flux))
    if not peak_flux > 0:
        return None
    peak_mag = float(flux_to_mag(np.array([peak_flux]), np.array([0.0]))[0][0])
    if peak_mag >= max_peak_mag:
        return None
    z_new = float(redshift_for_modulus(distance_modulus(z) + rng.uniform(0.0, max_peak_mag - peak_mag)))
    if not z_new > z:
        return None
    return moved(curve, z, z_new, rng, min_points, oid)


def moved(curve: Curve, z: float, z_new: float, rng: np.random.Generator, min_points: int = 5,
          oid: str | None = None) -> Curve | None:
    """Steps 2-4 of the module docstring for a given new redshift ``z_new`` (None: too few detections left)."""
    scale = 10.0 ** (-0.4 * float(distance_modulus(z_new) - distance_modulus(z)))
    stretch = (1.0 + z_new) / (1.0 + z)
    first = float(curve.mjd.min())
    mjd = first + (curve.mjd - first) * stretch
    flux = curve.flux * scale
    old_err = curve.flux_err * scale
    mag_new = flux_to_mag(flux, old_err)[0]
    band = curve.band
    err = np.abs(flux) * np.array([sigma_mag_model(m, b) if b in (0, 1) else np.nan for m, b in zip(mag_new, band)]) \
        / (2.5 / np.log(10.0))
    err = np.fmax(err, old_err)
    flux = flux + rng.standard_normal(len(flux)) * np.sqrt(np.maximum(err**2 - old_err**2, 0.0))
    keep = np.isfinite(flux) & np.isfinite(err) & (np.abs(flux) >= DETECTION_SIGMA * err)
    if keep.sum() < min_points:
        return None
    return Curve(oid=curve.oid if oid is None else oid, mjd=mjd[keep], band=band[keep], flux=flux[keep],
                 flux_err=err[keep])


def redshifted_curves(curves: Sequence[Curve], redshifts: Mapping[str, float], n_views: int,
                      seed_of, max_peak_mag: float = 20.0) -> tuple[list[Curve], list[str]]:
    """Up to ``n_views`` redshifted copies of each curve with a known redshift, named ``<oid>#z<k>``, and the oid each
    came from. ``seed_of(oid)`` gives the object's random seed (the same copies in every run)."""
    out, owners = [], []
    for curve in curves:
        z = redshifts.get(curve.oid)
        if z is None or n_views <= 0:
            continue
        rng = np.random.default_rng(seed_of(curve.oid))
        for k in range(n_views):
            view = redshifted(curve, float(z), rng, max_peak_mag, oid=f"{curve.oid}#z{k}")
            if view is not None:
                out.append(view)
                owners.append(curve.oid)
    return out, owners
