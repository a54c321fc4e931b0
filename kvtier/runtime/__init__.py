"""The Ray side of kvtier: the controller and warm shard actors, the client, the public API behind
``kvtier.init/put/get/...``, and the ``kvtier start``/``kvtier status`` commands.

Importing this package imports nothing; each module imports Ray itself, so ``import kvtier`` stays
free of Ray. Layout: ``api`` (one client per process) -> ``client`` (hot tier, calls) ->
``controller`` (index via ``kvtier.placement``) and ``shard`` (blocks as Ray objects); ``names``
holds the actor names every process agrees on.
"""
