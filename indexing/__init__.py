"""indexing stage: doc tower → FAISS index artifact → versioned registry → loaded for search.

Modules: `layout` (artifact kind and file names, id map), `factory` (FAISS structures from
config), `gpu` (device placement), `build` (embed the corpus, write the artifact), `publish`
(versioned registry with an atomic CURRENT pointer), `load` (verified load + search).
Import the module you need: `build` pulls in torch, `load` does not.
"""
