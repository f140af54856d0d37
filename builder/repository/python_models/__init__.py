"""``model.py`` files of the Python-backend models, copied into the repository by the build.

Each is small: the logic lives in :mod:`builder.runtime`, imported from one place.
"""
