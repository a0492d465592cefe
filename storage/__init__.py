"""SQLAlchemy storage for Chinwag: models, engine, repository and migrations."""
