"""Stage download_ett: put the forecasting CSV named by params at data/raw/<name>.csv, verified
against its sha256 pin in data.ett.pins (a name without a pin is accepted with a warning)."""

from pipeline import params as P
from pipeline.data import ett
from pipeline.data.fetch import fetch, file_digest, mirror_dir
from pipeline.errors import DataError
from pipeline.paths import ett_csv
from pipeline.runtime import run_stage


def main(argv):
    cfg = P.load()
    name = cfg.data.ett.name
    dest = ett_csv(name)
    pin = cfg.data.ett.pins.get(name, "")
    way_out = (f"set DATA_MIRROR (or data.mirror_dir) to a folder holding {dest.name}, e.g. "
               "DATA_MIRROR=../shared/data")
    if pin:
        way_out += (f"; or, if this file is meant to differ, change its pin data.ett.pins.{name} "
                    f"(now {pin}) or remove it")
    origin = fetch(dest, cfg.data.ett.url.format(name=name), pin, "sha256", mirror_dir(cfg.data.mirror_dir), way_out)
    try:
        frame = ett.load_csv(dest, cfg.data.ett.target)
        ett.split_borders(name, len(frame), 1)
    except DataError:
        dest.unlink(missing_ok=True)  # never leave a file that later stages would accept
        raise
    if not pin:
        print(f"WARNING: no sha256 pin for {name} in data.ett.pins; accepted {dest} unverified. Its sha256 is "
              f"{file_digest(dest)} (the mlp stages record it in their metrics); to pin it, add "
              f"`{name}: <that sha256>` under data.ett.pins.")
    print(f"{dest}: {len(frame)} rows, columns {list(frame.columns)} (from {origin}, "
          f"{'sha256 matches its pin' if pin else 'no pin'})")


if __name__ == "__main__":
    run_stage(main)
