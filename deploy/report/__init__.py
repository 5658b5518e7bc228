"""The HTML report: charts and one self-contained page drawn from the tools' JSON (matplotlib, an
optional extra; never TensorFlow, never sepconv.convert)."""


def renderer():
    """sepconv.deploy.report.html, imported now (deferred: a device's sepconv-deploy wheel may lack the report and
    matplotlib), or the install hint in one line.

    It needs matplotlib, not TensorFlow; a device's sepconv-deploy wheel has neither, so the report is drawn on the
    workstation, from the JSON the device wrote, with sepconv-report."""
    from sepconv.deploy.errors import RuntimeMissingError

    try:
        from sepconv.deploy.report import charts
        from sepconv.deploy.report import html as html_report
    except ImportError:
        raise RuntimeMissingError("The HTML report needs the workstation side of sepconv with matplotlib: "
                                  "pip install 'sepconv[report]'") from None
    charts.require_matplotlib()
    return html_report
