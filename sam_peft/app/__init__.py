"""The interactive web app (`sam-peft app`, needs the `app` extra): click organs on a CT, see every mask at once,
propagate them through the volume and export the labels. `state` holds the per-session logic without any
UI; `app` builds the gradio page; `cli` starts it."""
