"""The bottom layer every role may import: no side effects at import, no imports of docrl's roles."""
