"""The README's demo: a two-component Gaussian mixture fitted to Old Faithful.

    python -m emdsl.demo --output demo-output/faithful.png

Prints the labelled parameters and the final log-likelihood, and writes a PNG of
the data coloured by responsibility with the fitted components' ellipses, next to
the convergence of the log-likelihood and the ELBO.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import emdsl as em


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Fit a two-component mixture to Old Faithful.")
    parser.add_argument("--output", default="demo-output/faithful.png", help="where to write the PNG")
    args = parser.parse_args(argv)

    ds = em.datasets.load("faithful")
    model = (em.Model()
             .latent("z", em.Categorical(2))
             .observe(["eruptions", "waiting"], em.MultivariateNormal, name="x"))
    print(model, end="\n\n")
    fit = model.fit(ds, seed=0)
    print(fit, end="\n\n")
    for name, node in fit.params.children.items():
        for key, value in node.to_dataset().data_vars.items():
            if value.ndim <= 2:
                print(f"{name}.{key}:\n{value.round(4).to_pandas()}\n")
                continue
            state_dim = value.dims[0]  # a covariance per state: one table each
            for state in value[state_dim].values:
                table = value.sel({state_dim: state}).round(4).to_pandas()
                print(f"{name}.{key} ({state_dim}={state}):\n{table}\n")
    print(f"log-likelihood: {fit.loglik:.6f}  (converged: {fit.converged}, {fit.n_iter} iterations, "
          f"BIC {fit.bic():.3f})")

    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 4.5), layout="constrained")
    left, right = figure.subplots(1, 2)
    fit.plot.components(x="eruptions", y="waiting", ax=left)
    fit.plot.convergence(ax=right)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, dpi=120)
    print(f"figure: {output.resolve()}")


if __name__ == "__main__":
    main()
