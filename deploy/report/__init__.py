"""The HTML report: charts and one self-contained page drawn from the tools' JSON (matplotlib, an
optional extra; never TensorFlow, never sepconv.convert)."""

from sepconv.deploy.errors import RuntimeMissingError


def renderer():
    """sepconv.deploy.report.html, imported when a report is asked for, or the install hint in one line.

    It needs matplotlib (an optional extra), not TensorFlow; a device's sepconv-deploy wheel does not declare it, so
    the report is drawn on the workstation, from the JSON the device wrote, with sepconv-report."""
    try:
        from sepconv.deploy.report import charts
        from sepconv.deploy.report import html as html_report
    except ImportError:
        raise RuntimeMissingError("The HTML report needs the workstation side of sepconv with matplotlib: "
                                  "pip install 'sepconv[report]'") from None
    charts.require_matplotlib()
    return html_report
