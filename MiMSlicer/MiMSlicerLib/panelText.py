"""Rich text for the panel's labels (Qt labels render this subset of HTML in Slicer and in the test harness)."""
import html

COLOURS = {"error": "#b00020", "done": "#1b7f3b", "info": "#1f3b57", "hint": "#5f6b76", "warning": "#9a6700"}
ICONS = {"error": "✖ ", "done": "✔ ", "info": "", "hint": "→ ", "warning": "⚠ "}


def escape(text):
    return html.escape(text or "").replace("\n", "<br>")


def status(text, kind="info"):
    if not text:
        return ""
    return f'<span style="color:{COLOURS[kind]}">{ICONS[kind]}{escape(text)}</span>'


def labelPlan(plan):
    """The fine-tune label mapping with its problems, warnings and notes."""
    lines = []
    if plan.labels:
        lines.append("<b>Labels:</b> " + ", ".join(f"{escape(n)} = {v}" for n, v in plan.labels.items()))
    lines += [status(p, "error") for p in plan.problems]
    lines += [status(w, "warning") for w in plan.warnings]
    lines += [f'<span style="color:{COLOURS["hint"]}">• {escape(n)}</span>' for n in plan.notes]
    return "<br>".join(lines)
