"""Stage report: reports/report.md and a self-contained reports/report.html from the pipeline's
metrics, plot files and figures. Fails when results are missing unless report.allow_missing."""

from pipeline import params as P
from pipeline.report.build import OUT, Report, to_html
from pipeline.errors import StageError
from pipeline.outputs import write_text
from pipeline.runtime import run_stage
from pipeline.tracking import git_commit


def main(argv):
    params = P.load()
    report = Report(params)
    text = report.build(git_commit())
    if report.missing and not params.report.allow_missing:
        raise StageError("results are missing or incomplete: " + ", ".join(report.missing) + ". Run the stages that "
                         "write them (`dvc repro`), or build a partial report with "
                         "`dvc exp run -S report.allow_missing=true report`.")
    write_text(OUT / "report.md", text)
    write_text(OUT / "report.html", to_html(text, OUT))
    print(f"{OUT / 'report.md'} and {OUT / 'report.html'} written"
          + (f"; missing: {', '.join(report.missing)}" if report.missing else ""))


if __name__ == "__main__":
    run_stage(main)
