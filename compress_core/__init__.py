"""modelpress.core: stages, the encoded-tensor tree, recipes, the pipeline and metrics.

No file I/O and no other layer: `modelpress.formats` reads and writes models,
`modelpress.app` joins the two. The public API is the `modelpress` package.
"""
