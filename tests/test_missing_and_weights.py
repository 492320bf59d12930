"""Missing values and weights against independent references, and the errors bad input gets.

* EM for one multivariate normal with holes equals the textbook algorithm (Little & Rubin,
  *Statistical Analysis with Missing Data*, ch. 11), written out here from the book.
* A weighted fit equals the fit of the expanded table, each row repeated by its weight.
* Bad weights and data outside a family's support are ``ModelError`` naming the variable,
  what is wrong and, for data, how many values and the first position.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.stats as st
import xarray as xr

import emdsl as em

# -- missing values: the textbook EM for one multivariate normal ----------------------


def textbook_em(X: np.ndarray, mean: np.ndarray, cov: np.ndarray, n_iter: int, diag: bool
                ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Little & Rubin §11.2: EM for N(μ, Σ) from rows with holes (NaN); θ⁽⁰⁾ … θ⁽ⁿ⁾.

    Rows with nothing observed carry no information about θ (their likelihood is 1) and
    are dropped first, as in the book. E-step, per row with observed block o, missing m:
        x̂_m = μ_m + Σ_mo Σ_oo⁻¹ (x_o − μ_o),    C = Σ_mm − Σ_mo Σ_oo⁻¹ Σ_om
    so E[x] = x̂ and E[x xᵀ] = x̂ x̂ᵀ + C on the missing block. M-step: μ = mean of x̂,
    Σ = (1/N) Σ_n [(x̂_n − μ)(x̂_n − μ)ᵀ + C_n]. ``diag``: Σ is kept diagonal (the same
    E-step with a diagonal Σ, so x̂_m = μ_m; the M-step keeps the diagonal).
    """
    X = X[~np.isnan(X).all(axis=1)]
    N, D = X.shape
    mean, cov = mean.astype(float).copy(), cov.astype(float).copy()
    history = [(mean, cov)]
    for _ in range(n_iter):
        filled = X.copy()
        correction = np.zeros((D, D))
        for n in range(N):
            m = np.isnan(X[n])
            o = ~m
            if not m.any():
                continue
            B = np.linalg.solve(cov[np.ix_(o, o)], cov[np.ix_(o, m)]).T  # Σ_mo Σ_oo⁻¹
            filled[n, m] = mean[m] + B @ (X[n, o] - mean[o])
            correction[np.ix_(m, m)] += cov[np.ix_(m, m)] - B @ cov[np.ix_(o, m)]
        mean = filled.mean(axis=0)
        centred = filled - mean
        cov = (centred.T @ centred + correction) / N
        if diag:
            cov = np.diag(np.diag(cov))
        history.append((mean, cov))
    return history


def observed_loglik(X: np.ndarray, mean: np.ndarray, cov: np.ndarray) -> float:
    """Σ_n log N(x_o | μ_o, Σ_oo) over each row's observed block."""
    total = 0.0
    for row in X:
        o = ~np.isnan(row)
        if o.any():
            total += st.multivariate_normal(mean[o], cov[np.ix_(o, o)]).logpdf(row[o])
    return total


@pytest.fixture(scope="module")
def rows_with_holes() -> np.ndarray:
    rng = np.random.default_rng(42)
    mixing = np.array([[1.0, 0.0, 0.0], [0.7, 0.6, 0.0], [-0.4, 0.5, 0.8]])
    X = rng.normal(size=(40, 3)) @ mixing.T + [1.0, -2.0, 5.0]
    X[rng.random(X.shape) < 0.2] = np.nan
    X[7] = np.nan  # one row with nothing observed
    X[8] = [np.nan, np.nan, 0.3]
    return X


@pytest.mark.parametrize("covariance", ["full", "diag"])
def test_missing_value_em_equals_the_textbook_algorithm(rows_with_holes, covariance):
    X = rows_with_holes
    assert np.isnan(X).any(axis=1).sum() > 10 and (np.isnan(X).sum(axis=1) == 2).any()
    diag = covariance == "diag"
    mean0 = np.array([0.0, 0.0, 4.0])
    cov0 = np.array([[2.0, 0.5, 0.0], [0.5, 1.0, 0.3], [0.0, 0.3, 3.0]])
    if diag:
        cov0 = np.diag(np.diag(cov0))
    ds = xr.Dataset({"x": (("sample", "feature"), X)}, coords={"feature": ["a", "b", "c"]})
    model = em.Model().observe("x", em.MultivariateNormal(covariance=covariance))
    # plain EM (accelerate=None): the textbook algorithm's iterates, one M-step each
    fit = model.fit(ds, init={"x": {"mean": mean0, "covariance": np.diag(cov0) if diag else cov0}},
                    max_iter=50, tol=0, accelerate=None)
    assert fit.n_iter == 50
    history = textbook_em(X, mean0, cov0, 50, diag)
    mean, cov = history[-1]
    np.testing.assert_allclose(fit.params["x"]["mean"].values, mean, rtol=1e-8)
    got_cov = fit.params["x"]["covariance"].values
    np.testing.assert_allclose(np.diag(got_cov) if diag else got_cov, cov, rtol=1e-8, atol=1e-10)
    assert fit.loglik == pytest.approx(observed_loglik(X, mean, cov), rel=1e-10)
    # the same path, not only the same end (diag converges within a few iterations): ℓ(θ⁽ᵗ⁾)
    # for t = 0 … 50, the start evaluated as given
    np.testing.assert_allclose(fit.trace["loglik"].values, [observed_loglik(X, *theta) for theta in history],
                               rtol=1e-10)


# -- weights: a weight is that many copies of a row -----------------------------------


N_ROWS = 60


def _weighted_case(family: str, holes: bool, seed: int) -> tuple[em.Model, xr.Dataset]:
    rng = np.random.default_rng(seed)
    z = rng.integers(0, 2, size=N_ROWS)
    if family == "normal":
        values, dims = rng.normal(np.where(z == 0, -1.0, 2.5), 1.0), ("sample",)
        decl = em.Normal()
    elif family == "mvn-full":
        values = rng.normal(size=(N_ROWS, 2)) @ [[1.0, 0.5], [0.0, 0.8]] + np.where(z[:, None] == 0, 0.0, 3.0)
        dims, decl = ("sample", "feature"), em.MultivariateNormal()
    elif family == "poisson":
        values, dims, decl = rng.poisson(np.where(z == 0, 2.0, 9.0)).astype(float), ("sample",), em.Poisson()
    elif family == "bernoulli":
        p = np.where(z[:, None] == 0, [0.2, 0.7], [0.8, 0.4])
        values, dims, decl = (rng.random((N_ROWS, 2)) < p).astype(float), ("sample", "item"), em.Bernoulli()
    elif family == "categorical":
        levels = np.array(["a", "b", "c"], dtype=object)
        p = np.where(z[:, None] == 0, [0.7, 0.2, 0.1], [0.1, 0.3, 0.6])
        values, dims, decl = levels[(rng.random((N_ROWS, 1)) > p.cumsum(axis=1)).sum(axis=1)], ("sample",), \
            em.Categorical()
    else:
        raise AssertionError(family)
    if holes:
        hole = rng.random(values.shape) < 0.15
        values = values.copy()
        values[hole] = None if values.dtype == object else np.nan
    weights = rng.integers(0, 4, size=N_ROWS).astype(float)  # 0: the row is left out of the expanded table
    ds = xr.Dataset({"x": (dims, values), "w": ("sample", weights)})
    model = em.Model().latent("z", em.Categorical(2)).observe("x", decl)
    return model, ds


@pytest.mark.parametrize("init", ["responsibilities", "values"])
@pytest.mark.parametrize("holes", [False, True], ids=["complete", "holes"])
@pytest.mark.parametrize("family", ["normal", "mvn-full", "poisson", "bernoulli", "categorical"])
def test_weighted_fit_equals_the_expanded_table(family, holes, init):
    model, ds = _weighted_case(family, holes, seed=len(family) + 10 * holes)
    weights = ds["w"].values.astype(int)
    rows = np.repeat(np.arange(N_ROWS), weights)
    expanded = ds.drop_vars("w").isel(sample=rows)
    if family == "categorical":  # the same levels on both sides, or the two models differ
        assert set(expanded["x"].values[expanded["x"].notnull().values]) == {"a", "b", "c"}
    # The same start on both sides (k-means++ on the expanded rows would draw other seeds):
    # the same responsibilities per distinct row, or the same starting values (a previous fit's).
    resp = xr.DataArray(np.random.default_rng(7).dirichlet([1.0, 1.0], size=N_ROWS), dims=("sample", "z"))
    if init == "responsibilities":
        start_weighted, start_expanded = resp, resp.isel(sample=rows)
    else:
        start_weighted = start_expanded = model.fit(ds, weights="w", init=resp, max_iter=1, tol=0, accelerate=None)
    # plain EM (accelerate=None): the same thirty M-steps on both sides, compared iterate by iterate
    # (an accelerated path branches on comparisons of ℓ that rounding may tip either way)
    weighted = model.fit(ds, weights="w", init=start_weighted, max_iter=30, tol=0, accelerate=None)
    repeated = model.fit(expanded, init=start_expanded, max_iter=30, tol=0, accelerate=None)
    assert weighted.loglik == pytest.approx(repeated.loglik, rel=1e-10)
    for name, node in repeated.params.children.items():
        for key, expected in node.to_dataset().data_vars.items():
            np.testing.assert_allclose(weighted.params[name][key].values, expected.values, rtol=1e-10, atol=1e-12,
                                       err_msg=f"{name}.{key}")
    assert weighted.bic() == pytest.approx(repeated.bic(), rel=1e-10)
    assert weighted.aic() == pytest.approx(repeated.aic(), rel=1e-10)
    np.testing.assert_allclose(weighted.trace["loglik"].values, repeated.trace["loglik"].values, rtol=1e-10)


def test_weights_as_a_dataarray_equal_weights_by_name():
    model, ds = _weighted_case("normal", True, seed=3)
    start = xr.DataArray(np.random.default_rng(1).dirichlet([1.0, 1.0], size=N_ROWS), dims=("sample", "z"))
    by_name = model.fit(ds, weights="w", init=start, max_iter=10, tol=0)
    by_array = model.fit(ds.drop_vars("w"), weights=ds["w"], init=start, max_iter=10, tol=0)
    assert by_name.loglik == by_array.loglik
    np.testing.assert_array_equal(by_name.params["x"]["mean"].values, by_array.params["x"]["mean"].values)


@pytest.mark.parametrize("layout", ["in-memory", "dask data", "dask weights"])
def test_weighted_units_are_the_expanded_tables(layout):
    """The internal units (each element's mean and spread) count a row w times, in memory and on
    dask (merged chunk by chunk), so that holes start at the same mean as on the expanded table."""
    model, ds = _weighted_case("mvn-full", True, seed=4)
    weights = ds["w"].values.astype(int)
    expanded = model.fit(ds.drop_vars("w").isel(sample=np.repeat(np.arange(N_ROWS), weights)), max_iter=0)
    if layout == "dask data":
        ds = ds.chunk({"sample": 7})
    given = ds["w"].chunk({"sample": 11}) if layout == "dask weights" else "w"
    weighted = model.fit(ds.drop_vars("w") if layout == "dask weights" else ds, weights=given, max_iter=0)
    unweighted = model.fit(ds.drop_vars("w"), max_iter=0)
    for key in ("center", "scale"):
        got = weighted.standardization["x"][key].values
        np.testing.assert_allclose(got, expanded.standardization["x"][key].values, rtol=1e-13, err_msg=key)
        assert np.abs(got - unweighted.standardization["x"][key].values).max() > 1e-3, key


@pytest.mark.parametrize("family", ["mvn", "poisson"])
@pytest.mark.parametrize("chunked", [False, True], ids=["in-memory", "dask"])
def test_element_seen_only_where_the_weight_is_zero_is_named(chunked, family):
    """Standardized or not, an element must have a value that counts; the count families used to
    fit one a made-up rate."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(10, 2)) if family == "mvn" else rng.poisson(3.0, size=(10, 2)).astype(float)
    x[:, 1] = np.where(np.arange(10) < 3, x[:, 1], np.nan)  # observed in the first three samples only
    ds = xr.Dataset({"x": (("sample", "f"), x), "w": ("sample", np.r_[0.0, 0.0, 0.0, np.ones(7)])})
    ds = ds.chunk({"sample": 4}) if chunked else ds
    declared = em.MultivariateNormal(dim="f") if family == "mvn" else em.Poisson()
    model = em.Model().latent("z", em.Categorical(2)).observe("x", declared)
    with pytest.raises(em.ModelError, match=r"variable 'x' at f=1 is observed only in samples of weight 0"):
        model.fit(ds, weights="w")
    ds["x"][:3, 1] = np.nan
    with pytest.raises(em.ModelError, match=r"variable 'x' at f=1 has no observed value \(every value is NaN\)"):
        model.fit(ds)


@pytest.mark.parametrize("chunked", [False, True], ids=["in-memory", "dask"])
def test_sample_of_weight_0_beyond_every_state_counts_for_nothing(chunked):
    """A sample of weight 0 whose value overflows every state's log-density (1.7e308 against rates
    near 1e153: L = −∞ everywhere) used to turn ℓ and the fit into NaN (0 · −∞): found by fuzzing
    dask against memory. It counts for nothing, so the fit is the fit without it; its score is
    −∞ (its probability rounds to 0) and its posterior an error naming the variable."""
    rng = np.random.default_rng(0)
    x = np.r_[rng.gamma(3.0, 1.0, 60), rng.gamma(12.0, 1.0, 60)] * 1e-153
    model = em.Model().latent("z", em.Categorical(2)).observe("x", em.Gamma)
    kept = xr.Dataset({"x": ("sample", x), "w": ("sample", rng.uniform(0.5, 2.0, 120))})
    ds = xr.concat([xr.Dataset({"x": ("sample", [1.7e308]), "w": ("sample", [0.0])}), kept], dim="sample")
    ds = ds.chunk({"sample": 50}) if chunked else ds
    with warnings.catch_warnings():
        # the overflow itself is detected and handled: numpy's warning does not reach the user
        warnings.simplefilter("error", RuntimeWarning)
        fit = model.fit(ds, weights="w", seed=0)
        want = model.fit(kept, weights="w", seed=0)
        scores = fit.score_samples(ds).values
        with pytest.raises(em.ModelError, match=r"observe\('x', Gamma\): the sample at row 0 .* below the float"):
            fit.predict_proba(ds).values
    assert np.isfinite(fit.traces["loglik"].values).all() and np.isfinite(fit.traces["slack"].values).all()
    assert fit.loglik == pytest.approx(want.loglik, rel=1e-10)
    for key in ("shape", "rate"):
        np.testing.assert_allclose(fit.params["x"][key].values, want.params["x"][key].values, rtol=1e-8)
    assert scores[0] == -np.inf and np.isfinite(scores[1:]).all()


def test_element_constant_where_the_weight_is_positive_is_named():
    y = np.r_[5.0, -3.0, np.full(8, 2.5)]  # varies only in the two samples of weight 0
    ds = xr.Dataset({"y": ("sample", y), "w": ("sample", np.r_[0.0, 0.0, np.full(8, 2.0)])})
    with pytest.raises(em.ModelError, match=r"variable 'y' is constant where its samples' weights are positive "
                                            r"\(every such value is 2.5"):
        NORMAL_MIXTURE.fit(ds, weights="w")


# -- bad input --------------------------------------------------------------------------


def _normal_data(n: int = 10) -> xr.Dataset:
    rng = np.random.default_rng(0)
    return xr.Dataset({"y": ("sample", rng.normal(size=n))}, coords={"sample": np.arange(100, 100 + n)})


NORMAL_MIXTURE = em.Model().latent("z", em.Categorical(2)).observe("y", em.Normal)


def _with(values: list[float] | np.ndarray) -> xr.Dataset:
    return _normal_data().assign(w=("sample", np.asarray(values, dtype=float)))


@pytest.mark.parametrize("weights, pattern", [
    ([1, 1, 1, -1, 1, 1, -2, 1, 1, 1],
     r"fit\(weights='w'\): 2 weights are negative, first at sample=103; weights must be finite and >= 0"),
    ([1, 1, 1, 1, np.nan, 1, 1, 1, 1, 1],
     r"fit\(weights='w'\): 1 weight is missing or infinite \(NaN, ±inf\), first at sample=104"),
    ([1, 1, 1, 1, 1, 1, 1, np.inf, 1, 1],
     r"fit\(weights='w'\): 1 weight is missing or infinite \(NaN, ±inf\), first at sample=107"),
    ([0] * 10, r"fit\(weights='w'\): every weight is 0; there is nothing to fit"),
], ids=["negative", "nan", "inf", "all-zero"])
def test_bad_weights_are_named(weights, pattern):
    with pytest.raises(em.ModelError, match=pattern):
        NORMAL_MIXTURE.fit(_with(weights), weights="w")


def test_weights_not_over_the_sample_dimension():
    ds = _normal_data()
    with pytest.raises(em.ModelError, match=r"weights must be 1-D over the sample dimension 'sample', "
                                            r"got dims \('other',\)"):
        NORMAL_MIXTURE.fit(ds, weights=xr.DataArray(np.ones(10), dims="other"))
    ds["w2"] = (("sample", "copy"), np.ones((10, 2)))
    with pytest.raises(em.ModelError, match=r"fit\(weights='w2'\): weights must be 1-D over the sample dimension "
                                            r"'sample', got dims \('sample', 'copy'\)"):
        NORMAL_MIXTURE.fit(ds, weights="w2")


def test_weights_name_that_does_not_exist():
    with pytest.raises(em.ModelError, match=r"fit\(weights='nope'\): the data have no variable 'nope'; "
                                            r"available: 'y'"):
        NORMAL_MIXTURE.fit(_normal_data(), weights="nope")


def _single(name: str, values: list[float], **extra: list[float]) -> xr.Dataset:
    n = len(values)
    variables = {name: ("sample", np.asarray(values, dtype=float))}
    variables.update({key: ("sample", np.asarray(v, dtype=float)) for key, v in extra.items()})
    return xr.Dataset(variables, coords={"sample": np.arange(100, 100 + n)})


# Each case: a family, data with a hole first (NaN is missing, never bad), the problem, and
# the message's parts: variable, count, first position (a sample label, not an index), what is wrong.
SUPPORT_CASES = {
    "binomial-trials-below-counts": (
        "x", em.Binomial(trials="n"), _single("x", [np.nan, 1, 5, 2, 7, 0], n=[4, 4, 4, 4, 4, 4]),
        r"observe\('x', Binomial\): variable 'x' has 2 values outside the support, first at sample=102; "
        r".*counts above trials"),
    "poisson-negative": (
        "c", em.Poisson(), _single("c", [np.nan, 1, 3, -2, 4, -1]),
        r"observe\('c', Poisson\): variable 'c' has 2 values outside the support, first at sample=103; "
        r"Poisson counts must be non-negative integers"),
    "poisson-non-integer": (
        "c", em.Poisson(), _single("c", [np.nan, 1, 3, 2, 0.5, 1]),
        r"observe\('c', Poisson\): variable 'c' has 1 value outside the support, first at sample=104; "
        r"Poisson counts must be non-negative integers"),
    "bernoulli-two": (
        "b", em.Bernoulli(), _single("b", [np.nan, 1, 0, 2, 1, 0]),
        r"observe\('b', Bernoulli\): variable 'b' has 1 value outside the support, first at sample=103; "
        r"Bernoulli values must be 0 or 1"),
    "beta-outside-unit-interval": (
        "s", em.Beta(), _single("s", [np.nan, 0.2, 1.5, 0.3, -0.1, 0.6]),
        r"observe\('s', Beta\): variable 's' has 2 values outside the support, first at sample=102; "
        r"Beta data must lie strictly between 0 and 1"),
    "normal-inf": (
        "y", em.Normal(), _single("y", [np.nan, 0.2, np.inf, 1.5, -np.inf, 0.1]),
        r"observe\('y', Normal\): variable 'y' has 2 infinite values \(±inf\), first at sample=102; "
        r"remove them, or replace them by NaN"),
    "poisson-inf": (
        "c", em.Poisson(), _single("c", [np.nan, 1, 2, 3, np.inf, 1]),
        r"observe\('c', Poisson\): variable 'c' has 1 infinite value \(±inf\), first at sample=104"),
    "gamma-minus-inf": (
        "g", em.Gamma(), _single("g", [np.nan, 1, -np.inf, 3, 2, 1]),
        r"observe\('g', Gamma\): variable 'g' has 1 infinite value \(±inf\), first at sample=102"),
}


@pytest.mark.parametrize("case", SUPPORT_CASES)
def test_data_outside_the_support_is_named_with_count_and_first_position(case):
    name, family, ds, pattern = SUPPORT_CASES[case]
    with pytest.raises(em.ModelError, match=pattern):
        em.Model().latent("z", em.Categorical(2)).observe(name, family).fit(ds)


def test_infinite_value_in_an_event_names_its_element():
    x = np.array([[0.2, 1.0], [np.nan, 2.0], [1.5, 3.0], [4.0, -np.inf], [-0.1, np.inf], [0.3, 0.4]])
    ds = xr.Dataset({"x": (("sample", "f"), x)}, coords={"f": ["p", "q"], "sample": np.arange(100, 106)})
    with pytest.raises(em.ModelError, match=r"observe\('x', MultivariateNormal\): variable 'x' has 2 infinite "
                                            r"values \(±inf\), first at sample=103, f='q'"):
        em.Model().latent("z", em.Categorical(2)).observe("x", em.MultivariateNormal).fit(ds)


@pytest.mark.parametrize("dtype", ["U", object])
def test_poisson_given_strings(dtype):
    ds = xr.Dataset({"c": ("sample", np.array(["1", "2", "x", "3"], dtype=dtype))})
    with pytest.raises(em.ModelError, match=r"observe\('c', Poisson\): variable 'c' is not numeric .*"
                                            r"for labels use em.Categorical"):
        em.Model().observe("c", em.Poisson).fit(ds)


def test_a_pandas_nullable_boolean_column_with_na_is_a_bernoulli_with_holes():
    """pd.NA in a 'boolean' column is a missing value, as in an 'Int64' one (it raised TypeError)."""
    import pandas as pd

    rng = np.random.default_rng(0)
    z = rng.integers(0, 2, 200)
    flag = pd.array(np.where(np.arange(200) % 13 == 0, None, rng.random(200) < 0.2 + 0.6 * z), dtype="boolean")
    frame = pd.DataFrame({"x": rng.normal(3 * z, 1), "flag": flag})
    model = em.Model().latent("z", em.Categorical(2)).observe("x", em.Normal).observe("flag", em.Bernoulli)
    nullable = model.fit(frame, seed=0)
    as_floats = model.fit(frame.assign(flag=frame["flag"].astype(float)), seed=0)  # NA → NaN
    assert nullable.loglik == pytest.approx(as_floats.loglik, rel=1e-12)
    assert nullable.loglik == pytest.approx(float(nullable.score_samples(frame).sum()), rel=1e-12)
