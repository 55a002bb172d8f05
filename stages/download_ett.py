"""Stage download_ett: put the ETT CSV named by params at data/raw/<name>.csv, verified."""

from pipeline import params as P
from pipeline.data import ett
from pipeline.data.fetch import fetch, mirror_dir
from pipeline.errors import DataError
from pipeline.paths import ett_csv
from pipeline.runtime import run_stage


def main(argv):
    cfg = P.load()
    dest = ett_csv(cfg.data.ett.name)
    way_out = ("set DATA_MIRROR (or data.mirror_dir) to a folder holding "
               f"{dest.name}, e.g. DATA_MIRROR=../shared/data")
    origin = fetch(dest, cfg.data.ett.url.format(name=cfg.data.ett.name), cfg.data.ett.pins.get(cfg.data.ett.name, ""), "sha256",
                   mirror_dir(cfg.data.mirror_dir), way_out)
    try:
        frame = ett.load_csv(dest)
        ett.split_borders(cfg.data.ett.name, len(frame), 1)
    except DataError:
        dest.unlink(missing_ok=True)  # never leave a file that later stages would accept
        raise
    print(f"{dest}: {len(frame)} rows, columns {list(frame.columns)} (from {origin})")


if __name__ == "__main__":
    run_stage(main)
