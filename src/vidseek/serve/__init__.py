"""The search service: FastAPI app (`vidseek.serve.app.create_app`), the static web page, and the
index/search/serve/demo CLI commands (`vidseek.serve.commands`)."""
