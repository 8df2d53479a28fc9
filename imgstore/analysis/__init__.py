"""Analysis of benchmark runs: the tools behind ``imgstore compare`` and ``imgstore plot``.

Layering (each layer imports only the ones before it; no cycles)::

    storage core (store, manifest, checksums, ...) <- backends <- integrations (torch, datasets)
        <- analysis / CLI (this package, imgstore.cli) <- benchmarks/

The storage library never imports this package, and this package imports nothing of imgstore but
:mod:`imgstore.errors` (matplotlib only when a figure is drawn).  Inside it:

* :mod:`~imgstore.analysis.schema`  -- the result record every benchmark writes into ``extra_info``
  (one frozen dataclass with a version), written by the suite and parsed by every reader;
* :mod:`~imgstore.analysis.load`    -- reading and checking saved pytest-benchmark runs;
* :mod:`~imgstore.analysis.stats`   -- intervals, spreads between runs, machine drift;
* :mod:`~imgstore.analysis.verdict` -- a verdict per benchmark (``compare_runs``);
* :mod:`~imgstore.analysis.clocks`  -- the gate's verdict on CPU time, and on wall time where CPU time
  cannot see (``compare_clocks``);
* :mod:`~imgstore.analysis.report`  -- the terminal table, notes and Markdown of a comparison;
* :mod:`~imgstore.analysis.plot`    -- the tutorial's figures of one run.

Nothing is imported here, so ``import imgstore.analysis.schema`` (what the benchmark suite does)
loads neither numpy nor the statistics.
"""
