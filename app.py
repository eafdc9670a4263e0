"""Generation Studio's Gradio app; also the Hugging Face Spaces entry point (`python app.py`).

The operator's settings are environment variables: STUDIO_MODELS adds models to the allow-list
(`llm=hub/id,/a/folder;diffusion=...`, see README), STUDIO_ADAPTERS LoRA adapter folders for them
(`base-model=/a/folder,...;...`), STUDIO_REMOTE_LLM an OpenAI-compatible server.
"""

from studio.ui import build_app

app = build_app()

if __name__ == "__main__":
    app.queue(default_concurrency_limit=2).launch()
