"""`dvc plots show` renders offline: the configured template inlines vega, vega-lite and vega-embed."""

import re

from conftest import dvc, make_repo_copy


def test_dvc_plots_show_page_loads_nothing_from_the_network(tmp_path):
    repo = make_repo_copy(tmp_path / "repo")
    curves = repo / "metrics/backprop"
    curves.mkdir(parents=True)
    (curves / "train_loss.csv").write_text("step,epoch,train_loss\n0,0,1.0\n1,0,0.8\n")
    (curves / "val_accuracy.csv").write_text("epoch,val_accuracy\n0,0.5\n1,0.6\n")
    dvc(repo, "plots", "show", "-o", "out")
    page = (repo / "out/index.html").read_text()
    assert not re.search(r'<script[^>]+src=', page)                 # no CDN (DVC's default page uses one)
    for library in ("vega", "vega-lite", "vega-embed"):
        assert f"<!-- {library} " in page
    assert "vegaEmbed(" in page and "train_loss" in page
