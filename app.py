"""Generation Studio's Gradio app; also the Hugging Face Spaces entry point (`python app.py`)."""

from studio.ui import build_app

app = build_app()

if __name__ == "__main__":
    app.queue(default_concurrency_limit=2).launch()
