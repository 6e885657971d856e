"""Shared pytest setup. Its presence puts tests/ on sys.path, so tests import `helpers`."""
