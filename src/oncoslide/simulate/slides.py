"""Slides: tissue layout, spatially arranged morphologies, patch features and feature files.

Each slide is its own coordinate frame (its own tissue, margins and level-0 size): two slides of
a patient overlap in coordinates, as real slides do, and only the slide index tells them apart.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage, special

from oncoslide.features.schema import PatchGrid, write_feature_file
from oncoslide.simulate.config import (
    ENCODER_NAME,
    LEVEL0_MPP,
    PATCH_SIZE,
    PATCH_SIZE_LEVEL0,
    TARGET_MPP,
    SimulationConfig,
)
from oncoslide.simulate.patients import Patients, slide_ids
from oncoslide.simulate.world import World, random_unit


@dataclass(frozen=True, kw_only=True)
class SlideOut:
    slide_id: str
    n_patches: int
    labels: np.ndarray  # global prototype index per patch, in file order
    immune_neighbours: int  # in-slide 4-neighbours of immune patches (tissue only)
    immune_tumour_neighbours: int  # of those, tumour patches
    n_immune: int
    n_tumour: int
    # site-shift worlds: the prototype whose true centre is nearest to each patch (what a reader
    # that knows the source geometry sees), None elsewhere
    nearest: np.ndarray | None = None

    @property
    def nearest_correct(self) -> int:
        return -1 if self.nearest is None else int((self.nearest == self.labels).sum())


def tissue_layout(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Grid cells (row, col) of n tissue patches forming one to three blobs; grid height, width."""
    area = n * rng.uniform(2.5, 4.0)
    aspect = rng.uniform(0.6, 1.6)  # width / height
    h = max(4, math.ceil(math.sqrt(area / aspect)))
    w = max(4, math.ceil(area / h))
    n_blobs = int(rng.choice([1, 2, 3], p=[0.5, 0.3, 0.2]))
    weights = rng.dirichlet(np.full(n_blobs, 3.0))
    yy, xx = np.mgrid[0:h, 0:w].astype(float)
    field = np.zeros((h, w))
    for b in range(n_blobs):
        cy, cx = rng.uniform(0.25, 0.75) * h, rng.uniform(0.25, 0.75) * w
        radius = max(1.0, math.sqrt(n * weights[b] / math.pi)) * rng.uniform(0.8, 1.2)
        sx = radius * math.sqrt(rng.uniform(0.6, 1.6))  # a little elongated
        sy = radius * radius / sx
        field += weights[b] * np.exp(-0.5 * (((yy - cy) / sy) ** 2 + ((xx - cx) / sx) ** 2))
    # an irregular boundary: add smooth noise before thresholding
    rough = ndimage.gaussian_filter(rng.standard_normal((h, w)), sigma=1.5)
    field = field / field.max() + 0.15 * rough / (rough.std() + 1e-12)
    order = np.argsort(-field.ravel(), kind="stable")[:n]
    cells = np.sort(order)  # raster order: by row (y), then column (x)
    return cells // w, cells % w, h, w


def assign_prototypes(
    rows: np.ndarray,
    cols: np.ndarray,
    shape: tuple[int, int],
    mix: np.ndarray,
    beta: np.ndarray,
    cluster_length: float,
    rng: np.random.Generator,
    *,
    immune: int | None = None,
    tumour: np.ndarray | None = None,
    attraction: float = 0.0,
) -> np.ndarray:
    """Local prototype index per patch: multinomial counts placed in spatially clustered regions.

    The counts per prototype are Multinomial(n, mix), so the spatial arrangement never changes
    how much of each prototype a slide holds. Each prototype gets a smooth unit-variance Gaussian
    random field; a patch's score for prototype k is beta_k * field_k + Gumbel noise, and patches
    are filled greedily from the highest scores while the prototype's quota lasts. beta_k = 0
    places prototype k at random (diffuse); a large beta_k packs it into its field's peaks.

    With ``attraction`` != 0 the immune score (local index ``immune``) also gains
    attraction * T, T the standardised sum of the ``tumour`` fields: immune patches then sit
    inside tumour regions (attraction > 0, inflamed) or away from them (< 0, excluded), with
    the same counts and no extra random draws.
    """
    n, k = len(rows), len(mix)
    quota = rng.multinomial(n, mix)
    scores = np.empty((n, k))
    fields = []
    for _ in range(k):
        g = ndimage.gaussian_filter(rng.standard_normal(shape), sigma=cluster_length)
        fields.append((g, g.std() + 1e-12))
    for j, (g, sd) in enumerate(fields):
        scores[:, j] = beta[j] * g[rows, cols] / sd
    scores += rng.gumbel(size=scores.shape)
    labels = fill_quotas(scores, quota)
    if attraction != 0.0 and immune is not None and tumour is not None and len(tumour):
        g, sd = fields[immune]
        labels = _place_immune(
            rows, cols, shape, labels, immune, tumour, beta[immune] * g / sd, attraction, rng
        )
    return labels
    return fill_quotas(scores, quota)


def _place_immune(
    rows: np.ndarray,
    cols: np.ndarray,
    shape: tuple[int, int],
    labels: np.ndarray,
    immune: int,
    tumour: np.ndarray,
    own: np.ndarray,
    attraction: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """Move the immune patches towards (attraction > 0) or away from tumour, keeping all counts.

    Each tissue cell scores beta_immune * (immune field) + attraction * (standardised number of
    tumour patches among its 4 neighbours) + Gumbel noise; the immune patches take the best
    cells, and the patches they displace take the cells the immune patches left.
    """
    grid = np.zeros(shape)
    grid[rows, cols] = np.isin(labels, tumour)
    cross = np.array([[0, 1, 0], [1, 0, 1], [0, 1, 0]])
    density = ndimage.convolve(grid, cross, mode="constant")[rows, cols]
    density = (density - density.mean()) / (density.std() + 1e-12)
    score = own[rows, cols] + attraction * density + rng.gumbel(size=len(rows))
    was = labels == immune
    chosen = np.zeros(len(rows), dtype=bool)
    chosen[np.argsort(-score, kind="stable")[: int(was.sum())]] = True
    out = labels.copy()
    out[chosen] = immune
    out[was & ~chosen] = labels[chosen & ~was]  # displaced patches move into the freed cells
    return out


def fill_quotas(scores: np.ndarray, quota: np.ndarray) -> np.ndarray:
    """Give each row a column, each column exactly ``quota`` rows, favouring high scores.

    In each round every unassigned row proposes its best column that still has room; a column
    keeps its highest-scoring proposers up to its quota and is closed when full. A round either
    assigns every row or closes a column, so there are at most (columns + 1) rounds.
    """
    quota = quota.copy()
    labels = np.full(scores.shape[0], -1)
    while (open_rows := np.flatnonzero(labels < 0)).size:
        masked = np.where(quota[None, :] > 0, scores[open_rows], -np.inf)
        proposal = np.argmax(masked, axis=1)
        for j in np.unique(proposal):
            members = open_rows[proposal == j]
            best = members[np.argsort(-scores[members, j], kind="stable")[: quota[j]]]
            labels[best] = j
            quota[j] -= len(best)
    return labels


def state_values(cfg: SimulationConfig, world: World, pts: Patients, i: int) -> np.ndarray:
    """(K,) the cell-state value of every prototype for patient i (0 where it has no state)."""
    z = pts.z[i]
    state = np.where(world.state_latent >= 0, z[np.maximum(world.state_latent, 0)], 0.0)
    if cfg.has_genomic:
        state = np.where(world.genomic_state, pts.genomic_visible[i], state)
    return state


def patch_features(
    world: World,
    labels: np.ndarray,
    state: np.ndarray,
    site: str,
    cfg: SimulationConfig,
    rng: np.random.Generator,
) -> np.ndarray:
    """Features of one slide's patches from their global prototype labels (float32)."""
    n, d = len(labels), cfg.feature_dim
    # per-prototype mean: centre, plus the tumour cell state (a shift along the prototype's
    # state direction that grows with its latent)
    means = world.centres + cfg.state_signal * state[:, None] * world.state_dirs
    shift = world.site_shift[site] + cfg.slide_effect * random_unit(rng, 1, d)[0]
    x = rng.standard_normal((n, d), dtype=np.float32)  # isotropic patch noise (unit sd)
    x += (means + shift[None, :]).astype(np.float32)[labels]
    r = world.lowrank.shape[1]
    if r > 0:
        u = rng.standard_normal((n, r), dtype=np.float32)
        for k in np.unique(labels):
            sel = np.flatnonzero(labels == k)
            x[sel] += u[sel] @ world.lowrank[k].astype(np.float32)
    if site in world.site_transform:
        x = world.site_transform[site].apply(x, labels)
    x *= world.scale.astype(np.float32)
    x += world.offset.astype(np.float32)
    return x


def neighbour_counts(
    rows: np.ndarray,
    cols: np.ndarray,
    labels: np.ndarray,
    is_immune: np.ndarray,
    is_tumour: np.ndarray,
) -> tuple[int, int]:
    """In one slide: 4-neighbours of immune patches that are tissue, and of those, tumour.

    ``is_immune`` and ``is_tumour`` are boolean tables over the global prototype index.
    """
    grid = np.full((int(rows.max()) + 3, int(cols.max()) + 3), -1)
    grid[rows + 1, cols + 1] = labels  # a one-cell border of background around the tissue
    sel = is_immune[labels]
    r, c = rows[sel] + 1, cols[sel] + 1
    tissue = tumours = 0
    for dr, dc in ((1, 0), (-1, 0), (0, 1), (0, -1)):
        nb = grid[r + dr, c + dc]
        nb = nb[nb >= 0]
        tissue += len(nb)
        tumours += int(is_tumour[nb].sum())
    return tissue, tumours


def simulate_patient_slides(
    i: int,
    cfg: SimulationConfig,
    world: World,
    pts: Patients,
    seq: np.random.SeedSequence,
    shuffle_seq: np.random.SeedSequence | None,
    features_dir: Path,
    fingerprint: str,
) -> list[SlideOut]:
    rng = np.random.default_rng(seq)
    c = int(pts.cohort[i])
    idx = world.cohort_protos[c]
    mix = special.softmax(pts.mix_logits[i, idx])
    protos = [world.prototypes[g] for g in idx]
    beta = np.full(len(idx), cfg.spatial_clustering)
    beta[[p.role == "immune" for p in protos]] = pts.immune_beta[i]
    immune_local = [j for j, p in enumerate(protos) if p.role == "immune"]
    tumour_local = np.flatnonzero([p.is_tumour for p in protos])
    interface = cfg.has_interface and bool(immune_local)
    immune = immune_local[0] if interface else None
    attraction = float(pts.interface_attraction[i]) if interface else 0.0
    state = state_values(cfg, world, pts, i)
    shuffler = np.random.default_rng(shuffle_seq) if shuffle_seq is not None else None
    centres = world.output_centres()[idx] if world.shifted_sites else None
    is_immune = np.array([p.role == "immune" for p in world.prototypes])
    is_tumour = np.array([p.is_tumour for p in world.prototypes])
    out = []
    ids = slide_ids(pts.patient_id[i], len(pts.slide_patches[i]))
    for slide_id, n in zip(ids, pts.slide_patches[i], strict=True):
        rows, cols, h, w = tissue_layout(n, rng)
        local = assign_prototypes(
            rows,
            cols,
            (h, w),
            mix,
            beta,
            cfg.cluster_length,
            rng,
            immune=immune,
            tumour=tumour_local,
            attraction=attraction,
        )
        labels = idx[local]
        feats = patch_features(world, labels, state, pts.site[i], cfg, rng)
        # tissue sits somewhere on a larger glass slide: margins carry no information
        left, top, right, bottom = rng.integers(2, 16, size=4)
        if shuffler is not None:
            # ablation: the same patches (features and labels) on a random permutation of the
            # tissue cells, back in raster order: composition kept, arrangement destroyed
            perm = shuffler.permutation(n)
            rows, cols = rows[perm], cols[perm]
            order = np.lexsort((cols, rows))
            rows, cols, labels, feats = rows[order], cols[order], labels[order], feats[order]
        coords = np.stack(
            [(left + cols) * PATCH_SIZE_LEVEL0, (top + rows) * PATCH_SIZE_LEVEL0], axis=1
        ).astype(np.int64)
        grid = PatchGrid(
            patch_size=PATCH_SIZE,
            patch_size_level0=PATCH_SIZE_LEVEL0,
            target_mpp=TARGET_MPP,
            level0_mpp=LEVEL0_MPP,
            level0_width=int((left + w + right) * PATCH_SIZE_LEVEL0),
            level0_height=int((top + h + bottom) * PATCH_SIZE_LEVEL0),
            overlap=0,
        )
        write_feature_file(
            features_dir / f"{slide_id}.h5",
            feats,
            coords,
            grid=grid,
            encoder=ENCODER_NAME,
            weights_fingerprint=fingerprint,
            dtype=cfg.feature_dtype,
        )
        nb_tissue, nb_tumour = neighbour_counts(rows, cols, labels, is_immune, is_tumour)
        out.append(
            SlideOut(
                slide_id=slide_id,
                n_patches=n,
                labels=labels,
                immune_neighbours=nb_tissue,
                immune_tumour_neighbours=nb_tumour,
                n_immune=int(is_immune[labels].sum()),
                n_tumour=int(is_tumour[labels].sum()),
                nearest=None if centres is None else _nearest(feats, idx, centres),
            )
        )
    return out


def _nearest(feats: np.ndarray, idx: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """Global index of the nearest (Euclidean) true centre among the cohort's prototypes."""
    x = feats.astype(np.float64)
    d2 = (centres**2).sum(axis=1)[None, :] - 2.0 * x @ centres.T
    return idx[d2.argmin(axis=1)]
