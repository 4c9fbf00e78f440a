"""The verdicts: one :class:`Result` per property, gathered in a :class:`Report`."""

from __future__ import annotations

from typing import Any

import attrs


@attrs.define
class Result:
    """The verdict on one property. ``status``: ``pass``, ``fail`` or ``n/a`` (nothing to
    check, or the inputs it needs were not given)."""

    name: str
    title: str
    status: str = "pass"
    details: list[str] = attrs.field(factory=list)
    metrics: dict[str, Any] = attrs.field(factory=dict)
    checked: int = 0

    def fail(self, detail: str) -> None:
        self.status = "fail"
        if len(self.details) < 50:
            self.details.append(detail)

    @property
    def ok(self) -> bool:
        """True unless the property failed."""
        return self.status != "fail"

    def finish(self) -> Result:
        if self.status == "pass" and self.checked == 0:
            self.status = "n/a"
        return self


@attrs.define
class Report:
    """Every property's :class:`Result`; :attr:`ok` unless one of them failed."""

    results: list[Result]
    metrics: dict[str, Any] = attrs.field(factory=dict)

    @property
    def ok(self) -> bool:
        """True unless a property failed (``n/a`` passes, unless :meth:`require` made it fail)."""
        return all(r.ok for r in self.results)

    @property
    def violations(self) -> list[Result]:
        """The properties that failed."""
        return [r for r in self.results if not r.ok]

    def __getitem__(self, name: str) -> Result:
        for r in self.results:
            if r.name == name:
                return r
        raise KeyError(name)

    def require(self, *names: str) -> Report:
        """Fail each named property that checked nothing (``n/a``): a run that meant to
        exercise it did not. Unknown names raise KeyError. Returns the report."""
        for name in names:
            r = self[name]
            if r.status == "n/a":
                r.status = "fail"
                r.details.append("expected to be exercised, but the run gave it nothing to "
                                 "check (n/a)")
        return self

    @property
    def unexercised(self) -> list[str]:
        """The properties that checked nothing in this run."""
        return [r.name for r in self.results if r.status == "n/a"]

    def markdown(self) -> str:
        lines = ["| property | status | checked | details |", "|---|---|---|---|"]
        for r in self.results:
            detail = "; ".join(r.details[:3]).replace("|", "\\|")
            if r.metrics:
                m = ", ".join(f"{k}={_fmt(v)}" for k, v in r.metrics.items())
                detail = f"{m}; {detail}" if detail else m
            lines.append(f"| {r.name} {r.title} | {r.status} | {r.checked} | {detail} |")
        if self.metrics:
            lines += ["", "| metric | value |", "|---|---|"]
            lines += [f"| {k} | {_fmt(v)} |" for k, v in self.metrics.items()]
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "metrics": self.metrics,
                "results": [attrs.asdict(r) for r in self.results]}

    def summary(self) -> str:
        bad = [f"{r.name}: {r.details[:2]}" for r in self.violations]
        return "all properties hold" if not bad else "VIOLATIONS: " + "; ".join(bad)


def _fmt(v: Any) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v)
