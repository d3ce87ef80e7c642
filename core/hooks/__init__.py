"""The pack's one hook layer: a batch plan (``plan``), a low-rank gate (``gate``) and an attention tap (``tap``),
shared by every technique on every model family."""
