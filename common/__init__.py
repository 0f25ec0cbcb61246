"""The bottom layer (docs/ARCHITECTURE.md): helpers every package may import, importing none
of the project's own: number checks, transformers compatibility, byte units, tables."""
