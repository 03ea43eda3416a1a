"""Ingest: every channel (STOW-RS, C-STORE, `hounsfield import`, AI results) spools an instance (`spool`) and
hands it with its `origin` to the one entry, `service.StoreService.store`, which validates it (`wellformed`: the
file's structure; `checks`, `parse`, `columns`), asks the policy about it (`admission`), stores and indexes it,
and tells the listeners bound at construction (`events`). `outcome` and `reasons` are what each channel answers;
`gc` collects the blobs no row names; `activity` tells deferred work when ingest was last busy."""
