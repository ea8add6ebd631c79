"""``difflab report``: the course report (figures, tables, numbers) from one command.

A top package above the problem packages: it imports them, none of them imports it.
Each section is built by :mod:`difflab.report.sections` into its own folder, keyed on a
hash of its inputs and options (:mod:`difflab.report.cache`), and the page is assembled
from the sections' records (:mod:`difflab.report.html`).
"""
