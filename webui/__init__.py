"""The SPO Studio Gradio page: a thin reader over `backend` and the job store."""
