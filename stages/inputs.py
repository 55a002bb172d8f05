"""Stage inputs (always run, and cheap): record the sha256 of every input DVC cannot see itself
(data/raw/inputs/: ett.json, images.json, weights/<cnn run>.json); each reader depends on its record."""

from pipeline import params as P
from pipeline.data import inputs
from pipeline.outputs import write_json
from pipeline.paths import INPUTS, input_record
from pipeline.runtime import run_stage


def main(argv):
    params = P.load()
    records = {"ett": inputs.ett_record(params), "images": inputs.images_record(params)}
    records.update({f"weights/{name}": inputs.weights_record(params, name) for name in params.cnn_experiments()})
    for kind, record in records.items():
        write_json(input_record(kind), record)
    print(f"inputs: recorded {', '.join(records)} in {INPUTS}")


if __name__ == "__main__":
    run_stage(main)
