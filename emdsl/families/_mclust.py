r"""mclust's constrained covariance models (Celeux & Govaert 1995; Fraley & Raftery 2002).

Each component's covariance is Σ_k = λ_k D_k A_k D_kᵀ: a volume λ_k = |Σ_k|^(1/D), a shape
A_k (diagonal, |A_k| = 1, entries in decreasing order) and an orientation D_k (the
eigenvectors). A model's three letters say which of the three are Equal across
components, Variable, or (orientation only) the Identity (axis-aligned). scikit-learn's
four structures are VVV ("full"), EEE ("tied"), VII ("spherical") and VVI ("diag"); this
module holds mclust's ten others:

=====  ===================  ===========================================================
model  Σ_k                  M-step from the scatters W_k = Σ_n r_nk (x_n − μ_k)(x_n − μ_k)ᵀ
=====  ===================  ===========================================================
EII    σ² I                 σ² = Σ_k tr W_k / (N D)
EEI    Σ (diagonal)         Σ = diag Σ_k W_k / N
VEI    λ_k B (diagonal)     alternating λ_k = tr(W_k B⁻¹) / (N_k D), B ∝ diag Σ_k W_k / λ_k
EVI    λ B_k (diagonal)     B_k = diag W_k / |diag W_k|^(1/D), λ = Σ_k |diag W_k|^(1/D) / N
VEE    λ_k C                alternating λ_k = tr(W_k C⁻¹) / (N_k D), C ∝ Σ_k W_k / λ_k (|C| = 1)
EVE    λ D A_k Dᵀ           given D, EVI's step on diag(Dᵀ W_k D); D by majorization (below)
VVE    D Λ_k Dᵀ             given D, Λ_k = diag(Dᵀ W_k D) / N_k; D by majorization
EEV    λ D_k A D_kᵀ         W_k = L_k Ω_k L_kᵀ: D_k = L_k, A ∝ Σ_k Ω_k, λ = |Σ_k Ω_k|^(1/D) / N
VEV    λ_k D_k A D_kᵀ       D_k = L_k, alternating λ_k = tr(Ω_k A⁻¹) / (N_k D), A ∝ Σ_k Ω_k / λ_k
EVV    λ C_k                C_k = W_k / |W_k|^(1/D), λ = Σ_k |W_k|^(1/D) / N
=====  ===================  ===========================================================

N = Σ_k N_k, eigenvalues in decreasing order. The alternating M-steps (VEI, VEE, VEV) start
from the previous point's shape, and each half-step is an exact conditional maximum of
Q, so Q rises from the first sweep on (a generalized-EM step even if stopped early);
they run until the shape moves by less than 1e-13. The diagonal models are stored in
the "diag" layout (K, D), the oriented ones as full matrices (K, D, D).

EVE's and VVE's common orientation D minimizes Σ_k tr(W_k D Λ_k⁻¹ Dᵀ) over orthogonal D,
by Kiers' (2002) majorization as mclust does (Browne & McNicholas 2014): with α_k the
largest eigenvalue of W_k, tr((W_k − α_k I) D Λ_k⁻¹ Dᵀ) is concave in D, so its tangent at
the current D₀ bounds it from above, and the bound's minimum over orthogonal matrices is
the Procrustes solution D = U Vᵀ of −Σ_k (W_k − α_k I) D₀ Λ_k⁻¹ = U S Vᵀ. Each sweep (D,
then Λ_k given D) lowers the objective, from the previous point's D.

Besides the M-steps: each model's free-parameter count (mclust's), the projection of
any covariance onto the model (geometric means of volumes, shapes or eigenvalues, in
log coordinates; accelerated proposals and given starts pass through it), the test
that a covariance has the structure, and the free coordinates the standard errors
differentiate in.
"""

from __future__ import annotations

import numpy as np

DIAGONAL = ("EII", "EEI", "VEI", "EVI")
ORIENTED = ("VEE", "EVE", "VVE", "EEV", "VEV", "EVV")
#: the models whose states share one orientation, estimated by majorization
COMMON_ORIENTATION = ("EVE", "VVE")
MODELS = DIAGONAL + ORIENTED
#: VEI's and VEV's alternation stops once the log shape moves less than this (or after _STEPS sweeps)
_TOL = 1e-13
_STEPS = 500


def free_params(kind: str, K: int, D: int) -> int:
    """The covariance's free parameters, as mclust counts them (a shape of determinant 1 has D − 1,
    an orientation D(D − 1)/2)."""
    rotation = D * (D - 1) // 2
    return {"EII": 1, "EEI": D, "VEI": K + D - 1, "EVI": 1 + K * (D - 1),
            "VEE": K + D * (D + 1) // 2 - 1, "EVE": 1 + K * (D - 1) + rotation, "VVE": K * D + rotation,
            "EEV": 1 + (D - 1) + K * rotation, "VEV": K + (D - 1) + K * rotation,
            "EVV": 1 + K * (D * (D + 1) // 2 - 1)}[kind]


# -- M-steps ------------------------------------------------------------------------------------
def covariances(kind: str, scatter: np.ndarray, nk: np.ndarray, previous: np.ndarray | None,
                empty: np.ndarray) -> np.ndarray:
    """The maximum of Q over the model's covariances, from the scatters W_k ((K, D) diagonals for the
    diagonal models, (K, D, D) for the oriented ones) and the counts N_k. A state without responsibility
    keeps its previous volume and shape (else the identity's); NaN where no state has a spread."""
    total = max(float(nk.sum()), 1e-300)
    if kind == "EII":
        return np.full(scatter.shape, scatter.sum() / (total * scatter.shape[1]))
    if kind == "EEI":
        return np.broadcast_to(scatter.sum(axis=0) / total, scatter.shape).copy()
    if kind in DIAGONAL:
        log_previous = None if previous is None else np.log(np.broadcast_to(previous, scatter.shape))
        log_volume, log_shape = _volumes_and_shapes(kind, np.log(scatter), nk, total, log_previous, empty)
        return np.exp(log_volume[:, None] + log_shape)
    if kind == "VEE":
        return _vee(scatter, nk, previous, empty)
    if kind in COMMON_ORIENTATION:
        return _common_orientation(kind, scatter, nk, total, previous, empty)
    values, vectors = eigen(scatter)  # W_k = L_k Ω_k L_kᵀ, Ω_k decreasing
    log_previous = None
    if previous is not None:
        log_previous = np.log(np.maximum(eigen(np.broadcast_to(previous, scatter.shape))[0], 1e-300))
    log_values = np.log(np.maximum(values, 0.0))
    log_volume, log_shape = _volumes_and_shapes({"EEV": "EEI", "VEV": "VEI", "EVV": "EVI"}[kind],
                                                log_values, nk, total, log_previous, empty)
    if kind == "EVV":  # the whole C_k: W_k over its volume, orientation and shape together
        with np.errstate(invalid="ignore"):
            out = scatter / np.exp(log_values.mean(axis=1))[:, None, None]
        out = out * np.exp(log_volume)[:, None, None]
        if empty.any():
            kept = np.broadcast_to(np.eye(scatter.shape[1]) if previous is None else previous, scatter.shape)
            out[empty] = _unit_volume(kept[empty]) * np.exp(log_volume[empty])[:, None, None]
        return out
    if empty.any() and previous is not None:  # an empty state keeps its previous orientation
        vectors[empty] = eigen(np.broadcast_to(previous, scatter.shape)[empty])[1]
    scaled = vectors * np.exp(log_volume[:, None, None] + log_shape[:, None, :])
    return np.einsum("kij,kcj->kic", scaled, vectors)


def _volumes_and_shapes(kind: str, log_w: np.ndarray, nk: np.ndarray, total: float,
                        log_previous: np.ndarray | None, empty: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """log λ_k (K,) and log shape (K, D) from the log scatters' (sorted) eigenvalues or diagonals, for the
    diagonal-shape models EEI-like (A shared, λ shared), VEI (A shared) and EVI (λ shared)."""
    K, D = log_w.shape
    full = ~empty
    if kind == "EVI":
        log_det = log_w.mean(axis=1)  # log |W_k|^(1/D); −∞ for a state without spread
        with np.errstate(invalid="ignore"):
            log_shape = log_w - log_det[:, None]
        log_volume = np.full(K, np.log(np.exp(log_det[full]).sum() / total) if full.any() else 0.0)
        if empty.any():
            kept = np.zeros((K, D)) if log_previous is None else log_previous
            log_shape[empty] = kept[empty] - kept[empty].mean(axis=1, keepdims=True)
        return log_volume, log_shape
    if kind == "EEI":  # EEV: A and λ from the summed eigenvalues
        pooled = np.log(np.exp(log_w[full]).sum(axis=0))
        log_volume = pooled.mean() - np.log(total)
        return np.full(K, log_volume), np.broadcast_to(pooled - pooled.mean(), (K, D)).copy()
    # VEI / VEV: coordinate ascent from the previous shape
    start = np.zeros((K, D)) if log_previous is None else log_previous
    log_shape = start.mean(axis=0) - start.mean()
    log_volume = start.mean(axis=1)
    counts = np.where(full, nk, 1.0)
    w = np.exp(log_w)
    for _ in range(_STEPS):
        log_volume = np.where(full, np.log((w * np.exp(-log_shape)).sum(axis=1) / (D * counts)), log_volume)
        with np.errstate(divide="ignore"):
            pooled = np.log((w[full] * np.exp(-log_volume[full])[:, None]).sum(axis=0))
        if not np.all(np.isfinite(pooled)):
            return np.full(K, np.nan), np.full((K, D), np.nan)
        new = pooled - pooled.mean()
        moved = float(np.abs(new - log_shape).max())
        log_shape = new
        if moved < _TOL:
            break
    log_volume = np.where(full, np.log((w * np.exp(-log_shape)).sum(axis=1) / (D * counts)), log_volume)
    return log_volume, np.broadcast_to(log_shape, (K, D)).copy()


def _vee(scatter: np.ndarray, nk: np.ndarray, previous: np.ndarray | None, empty: np.ndarray) -> np.ndarray:
    """VEE: Σ_k = λ_k C, alternating the exact λ_k given C and C given the λ_k from the previous shape."""
    K, D = scatter.shape[0], scatter.shape[1]
    start = np.broadcast_to(np.eye(D), scatter.shape) if previous is None else previous
    log_volume = np.linalg.slogdet(start)[1] / D
    shape = _unit_volume(start[:1])[0]
    full = ~empty
    counts = np.where(full, nk, 1.0)
    for _ in range(_STEPS):
        precision = np.linalg.inv(shape)
        log_volume = np.where(full, np.log(np.einsum("kij,ji->k", scatter, precision) / (D * counts)), log_volume)
        pooled = (scatter[full] / np.exp(log_volume[full])[:, None, None]).sum(axis=0)
        sign, log_det = np.linalg.slogdet(pooled)
        if not (sign > 0 and np.isfinite(log_det)):
            return np.full(scatter.shape, np.nan)
        new = pooled / np.exp(log_det / D)
        moved = float(np.abs(new - shape).max())
        shape = new
        if moved < _TOL:
            break
    precision = np.linalg.inv(shape)
    log_volume = np.where(full, np.log(np.einsum("kij,ji->k", scatter, precision) / (D * counts)), log_volume)
    return np.exp(log_volume)[:, None, None] * shape


def _common_orientation(kind: str, scatter: np.ndarray, nk: np.ndarray, total: float, previous: np.ndarray | None,
                        empty: np.ndarray) -> np.ndarray:
    """EVE and VVE: Σ_k = D Λ_k Dᵀ with one orientation D (see the module), from the previous D."""
    K, D = scatter.shape[0], scatter.shape[1]
    orientation = eigen((scatter.sum(axis=0) if previous is None else previous.mean(axis=0))[None])[1][0]
    log_previous = None if previous is None else np.log(np.einsum("ji,kjl,li->ki", orientation, previous, orientation))
    largest = np.linalg.eigvalsh(scatter)[:, -1]
    objective = np.inf
    for _ in range(_STEPS * 4):
        rotated = np.einsum("ji,kjl,li->ki", orientation, scatter, orientation)  # diag(Dᵀ W_k D)
        with np.errstate(divide="ignore"):
            log_rotated = np.log(np.maximum(rotated, 0.0))
        if kind == "EVE":
            log_volume, log_shape = _volumes_and_shapes("EVI", log_rotated, nk, total, log_previous, empty)
            log_diagonal = log_volume[:, None] + log_shape
        else:
            log_diagonal = log_rotated - np.log(np.where(empty, 1.0, nk))[:, None]
            if empty.any():
                log_diagonal[empty] = (np.zeros((K, D)) if log_previous is None else log_previous)[empty]
        if not np.all(np.isfinite(log_diagonal)):
            return np.full(scatter.shape, np.nan)
        inverse = np.exp(-log_diagonal)
        # −Q's covariance part at (D, Λ): its fall below 1e-15 relative ends the sweeps
        new_objective = float((nk[:, None] * log_diagonal).sum() + (rotated * inverse).sum())
        if objective - new_objective <= 1e-15 * abs(new_objective):
            break
        objective = new_objective
        gradient = np.einsum("kij,jl,kl->il", scatter - largest[:, None, None] * np.eye(D), orientation, inverse)
        u, _, vt = np.linalg.svd(-gradient)
        orientation = u @ vt
    scaled = orientation[None] * np.exp(log_diagonal)[:, None, :]
    return np.einsum("kij,cj->kic", scaled, orientation)


def eigen(cov: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues in decreasing order (K, D) and the eigenvectors as columns (K, D, D)."""
    values, vectors = np.linalg.eigh(0.5 * (cov + np.swapaxes(cov, -1, -2)))
    return values[..., ::-1], vectors[..., ::-1]


def _unit_volume(cov: np.ndarray) -> np.ndarray:
    return cov / np.exp(np.linalg.slogdet(cov)[1] / cov.shape[-1])[:, None, None]


# -- the structure ------------------------------------------------------------------------------
def _log_parts(kind: str, cov: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """log volumes (K,), log shapes (K, D) (diagonals, or decreasing eigenvalues) and eigenvectors."""
    if kind in DIAGONAL:
        log_cov = np.log(cov)
        vectors = None
    else:
        values, vectors = eigen(cov)
        log_cov = np.log(values)
    log_volume = log_cov.mean(axis=1)
    return log_volume, log_cov - log_volume[:, None], vectors


def has_structure(kind: str, cov: np.ndarray, tol: float = 1e-9) -> bool:
    """Whether covariances share what the model shares (volume, shape, both), to ``tol`` in log."""
    cov = np.asarray(cov, dtype=float)
    if not np.all(np.isfinite(cov)):
        return False
    if kind in ORIENTED and np.any(np.linalg.eigvalsh(cov) <= 0) or kind in DIAGONAL and np.any(cov <= 0):
        return False
    if kind == "VEE":  # one matrix shape C_k = Σ_k / |Σ_k|^(1/D)
        shapes = _unit_volume(cov)
        return bool(np.abs(shapes - shapes[:1]).max() <= tol * np.abs(shapes).max())
    if kind in COMMON_ORIENTATION:  # one set of eigenvectors (those of the mean); EVE: one volume
        orientation = eigen(cov.mean(axis=0)[None])[1][0]
        rotated = np.einsum("ji,kjl,lm->kim", orientation, cov, orientation)
        off = rotated - np.einsum("kii->ki", rotated)[:, :, None] * np.eye(cov.shape[-1])
        if np.abs(off).max() > tol * np.abs(rotated).max():
            return False
        return kind == "VVE" or bool(np.ptp(np.linalg.slogdet(cov)[1]) <= tol * cov.shape[-1])
    log_volume, log_shape, _ = _log_parts(kind, cov)
    equal_volume = np.ptp(log_volume) <= tol
    equal_shape = np.ptp(log_shape, axis=0).max() <= tol
    if kind == "EII":
        return bool(equal_volume and np.abs(log_shape).max() <= tol)
    return bool({"EEI": equal_volume and equal_shape, "VEI": equal_shape, "EVI": equal_volume,
                 "EEV": equal_volume and equal_shape, "VEV": equal_shape, "EVV": equal_volume}[kind])


def project(kind: str, cov: np.ndarray) -> np.ndarray:
    """The covariance moved onto the model: what it shares replaced by the geometric mean over the
    states (log volumes, log shapes: diagonals or decreasing eigenvalues), orientations kept."""
    cov = np.asarray(cov, dtype=float)
    if kind == "VEE":  # the states' shapes averaged, and scaled back to determinant 1
        volumes = np.exp(np.linalg.slogdet(cov)[1] / cov.shape[-1])
        return volumes[:, None, None] * _unit_volume(_unit_volume(cov).mean(axis=0)[None])
    if kind in COMMON_ORIENTATION:  # the mean's eigenvectors, each state's variances along them
        orientation = eigen(cov.mean(axis=0)[None])[1][0]
        log_diagonal = np.log(np.einsum("ji,kjl,li->ki", orientation, cov, orientation))
        if kind == "EVE":
            log_diagonal = log_diagonal - log_diagonal.mean(axis=1, keepdims=True) + log_diagonal.mean()
        scaled = orientation[None] * np.exp(log_diagonal)[:, None, :]
        return np.einsum("kij,cj->kic", scaled, orientation)
    log_volume, log_shape, vectors = _log_parts(kind, cov)
    if kind in ("EII", "EEI", "EVI", "EEV", "EVV"):
        log_volume = np.full_like(log_volume, log_volume.mean())
    if kind == "EII":
        log_shape = np.zeros_like(log_shape)
    if kind in ("EEI", "VEI", "EEV", "VEV"):
        log_shape = np.broadcast_to(log_shape.mean(axis=0), log_shape.shape)
    if kind in DIAGONAL:
        return np.exp(log_volume[:, None] + log_shape)
    if kind == "EVV":
        return _unit_volume(cov) * np.exp(log_volume)[:, None, None]
    assert vectors is not None
    scaled = vectors * np.exp(log_volume[:, None, None] + log_shape[:, None, :])
    return np.einsum("kij,kcj->kic", scaled, vectors)


# -- coordinates for the standard errors ------------------------------------------------------------
def coordinates(kind: str, cov: np.ndarray) -> np.ndarray:
    """Free coordinates of the covariance at the fit: log volumes (one, or one per state), the first D − 1
    log shapes (shared, or each state's), and for the oriented models each state's rotation away from
    its fitted eigenvectors (0 at the fit) or, for EVV, the Cholesky factor of C_k (log diagonal but
    its last entry, fixed by |C_k| = 1, and the entries below it)."""
    cov = np.asarray(cov, dtype=float)
    K, D = cov.shape[0], cov.shape[1]
    if kind in ("EVV", "VEE"):  # log volumes, and the Cholesky factors of the unit-volume shapes
        shapes = _unit_volume(cov)[:1] if kind == "VEE" else _unit_volume(cov)
        chol = np.linalg.cholesky(shapes)
        below = np.tril_indices(D, -1)
        parts = [np.log(np.diagonal(chol, axis1=1, axis2=2))[:, :D - 1], chol[:, below[0], below[1]]]
        log_volume = np.linalg.slogdet(cov)[1] / D
        return np.concatenate([log_volume if kind == "VEE" else log_volume[:1], np.hstack(parts).ravel()])
    if kind in COMMON_ORIENTATION:  # the variances along the fit's common axes, and a rotation of them
        orientation = eigen(cov.mean(axis=0)[None])[1][0]
        log_diagonal = np.log(np.einsum("ji,kjl,li->ki", orientation, cov, orientation))
        rotation = np.zeros(D * (D - 1) // 2)
        if kind == "VVE":
            return np.concatenate([log_diagonal.ravel(), rotation])
        log_volume = log_diagonal.mean(axis=1)
        shapes = (log_diagonal - log_volume[:, None])[:, :D - 1].ravel()
        return np.concatenate([log_volume[:1], shapes, rotation])
    log_volume, log_shape, _ = _log_parts(kind, cov)
    if kind == "EII":
        return log_volume[:1].copy()
    volumes = log_volume[:1] if kind in ("EEI", "EVI", "EEV") else log_volume
    shapes = log_shape[:, :D - 1].ravel() if kind == "EVI" else log_shape[0, :D - 1]
    rotations = np.zeros(K * D * (D - 1) // 2) if kind in ("EEV", "VEV") else np.zeros(0)
    return np.concatenate([volumes, shapes, rotations])


def from_coordinates(kind: str, psi: np.ndarray, at: np.ndarray) -> np.ndarray:
    """The covariance at coordinates ψ (see :func:`coordinates`); ``at`` is the fit's covariance, whose
    eigenvectors the rotations start from."""
    psi = np.asarray(psi, dtype=float)
    K, D = at.shape[0], at.shape[1]
    if kind == "EII":
        return np.full(at.shape, np.exp(psi[0]))
    if kind in ("EVV", "VEE"):
        below = np.tril_indices(D, -1)
        n_volumes = K if kind == "VEE" else 1
        # explicit rows: with D = 1 a row has no free entry, and reshape(-1, 0) is ambiguous
        free = psi[n_volumes:].reshape(1 if kind == "VEE" else K, D - 1 + len(below[0]))
        log_diag = np.hstack([free[:, :D - 1], -free[:, :D - 1].sum(axis=1, keepdims=True)])
        chol = np.zeros((len(free), D, D))
        chol[:, np.arange(D), np.arange(D)] = np.exp(log_diag)
        chol[:, below[0], below[1]] = free[:, D - 1:]
        return np.exp(psi[:n_volumes])[:, None, None] * chol @ np.swapaxes(chol, 1, 2)
    if kind in COMMON_ORIENTATION:
        from scipy.linalg import expm

        n_diagonal = K * D if kind == "VVE" else 1 + K * (D - 1)
        if kind == "VVE":
            log_diagonal = psi[:n_diagonal].reshape(K, D)
        else:
            first = psi[1:n_diagonal].reshape(K, D - 1)
            log_diagonal = psi[0] + np.hstack([first, -first.sum(axis=1, keepdims=True)])
        skew = np.zeros((D, D))
        skew[np.triu_indices(D, 1)] = psi[n_diagonal:]
        orientation = eigen(at.mean(axis=0)[None])[1][0] @ expm(skew - skew.T)
        scaled = orientation[None] * np.exp(log_diagonal)[:, None, :]
        return np.einsum("kij,cj->kic", scaled, orientation)
    n_volumes = 1 if kind in ("EEI", "EVI", "EEV") else K
    log_volume = np.broadcast_to(psi[:n_volumes], (K,))
    n_shapes = K * (D - 1) if kind == "EVI" else D - 1
    first = psi[n_volumes:n_volumes + n_shapes].reshape(K if kind == "EVI" else 1, D - 1)
    log_shape = np.broadcast_to(np.hstack([first, -first.sum(axis=1, keepdims=True)]), (K, D))
    if kind in DIAGONAL:
        return np.exp(log_volume[:, None] + log_shape)
    from scipy.linalg import expm

    vectors = eigen(at)[1]
    upper = np.triu_indices(D, 1)
    angles = psi[n_volumes + n_shapes:].reshape(K, -1)
    out = np.empty((K, D, D))
    for k in range(K):
        skew = np.zeros((D, D))
        skew[upper] = angles[k]
        rotation = vectors[k] @ expm(skew - skew.T)
        out[k] = (rotation * np.exp(log_volume[k] + log_shape[k])) @ rotation.T
    return out


def indices(kind: str, shape: tuple[int, ...]) -> np.ndarray:
    """A flat index into the covariance for each coordinate, to name it in messages."""
    K, D = shape[0], shape[1]
    size = int(np.prod(shape[1:]))
    n = free_params(kind, K, D)
    return (np.arange(n) % (K * size)).astype(np.intp)
