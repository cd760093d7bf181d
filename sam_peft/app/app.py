"""The gradio page: a slice viewer to click on, the organ and prompt controls, propagation and export.

Every event passes the visitor's own `Session` through `gr.State` (one per browser tab, deleted with it),
so two people never see each other's volume; the model is shared read-only through `AppModel`. A
handler's ValueError (a bad upload, a click outside the slice...) becomes a message on the page and
leaves the session as it was. Files are read only from uploads and the bundled example, never from a
path a request names.
"""
from __future__ import annotations

import html

import gradio as gr

from .state import MAX_UPLOAD_MB, MODES, UPLOAD_SUFFIXES, VIEW_WINDOWS, AppModel, Session, legend_rows, open_example, \
    open_upload

HELP = """Open a volume (NIfTI, zipped DICOM series, PNG/JPEG) or the example CT, pick an organ, then click on the
slice: **positive** / **negative** clicks refine that organ from its previous mask; **box corner** takes two
clicks (opposite corners). Propagate carries the organs prompted on this slice through the volume; Export
writes the label volume (NIfTI, on the input's grid and affine) and its label map (JSON)."""


def _legend(app: AppModel, session: Session | None) -> str:
    rows = "".join(f'<tr><td><span style="display:inline-block;width:1em;height:1em;background:{colour}"></span></td>'
                   f"<td>{html.escape(organ)}</td><td style='text-align:right'>{ml:.1f} mL</td></tr>"
                   for organ, colour, ml in legend_rows(app, session))
    return f"<table id='legend-table'>{rows}</table>" if rows else "<p>No organ segmented yet.</p>"


def build_app(app: AppModel, max_upload_mb: float = MAX_UPLOAD_MB) -> gr.Blocks:
    """The Blocks page for `app` (launch it with `.launch(...)`, or through `sam-peft app`)."""

    def view(session: Session | None, z, window, overlay):
        if session is None:
            return None, _legend(app, None)
        return session.render(app, int(z), window, overlay), _legend(app, session)

    def opened(old: Session | None, session: Session, window, overlay):
        if old is not None:
            old.close()
        z = session.depth // 2
        slider = gr.Slider(minimum=0, maximum=max(session.depth - 1, 1), value=z, interactive=session.depth > 1)
        shape = "x".join(map(str, session.pixels.shape[::-1]))
        status = f"Opened **{html.escape(session.name)}**: {shape} voxels ({session.modality}), axial slice {z} shown."
        return session, slider, *view(session, z, window, overlay), status

    def on_upload(old, file, window, overlay):
        if file is None:
            return old, gr.skip(), gr.skip(), gr.skip(), ""
        try:
            return opened(old, open_upload(app, file, max_upload_mb), window, overlay)
        except ValueError as error:
            return old, gr.skip(), gr.skip(), gr.skip(), f"**Cannot open the upload:** {html.escape(str(error))}"

    def on_example(old, window, overlay):
        return opened(old, open_example(app), window, overlay)

    def act(action):
        """A handler that changes the session: its message, or its error, goes to the status line."""
        def handler(session, z, organ, mode, window, overlay, *extra):
            if session is None:
                return session, None, _legend(app, None), "Open a volume first."
            try:
                status = action(session, int(z), organ, mode, *extra)
            except ValueError as error:
                status = f"**Error:** {html.escape(str(error))}"
            return session, *view(session, z, window, overlay), status
        return handler

    def on_click(session, z, organ, mode, window, overlay, evt: gr.SelectData):
        def click(s: Session, z, organ, mode):
            if evt.index is None:
                raise ValueError("the click lies outside the slice")
            x, y = (int(v) // s.display_scale for v in evt.index)
            return s.click(app, z, x, y, organ, mode)
        return act(click)(session, z, organ, mode, window, overlay)

    def on_propagate(session, z, organ, mode, window, overlay, reach, progress=gr.Progress(track_tqdm=True)):
        return act(lambda s, z, _, __, reach: s.propagate(app, z, int(reach), progress=True))(
            session, z, organ, mode, window, overlay, reach)

    def on_export(session):
        if session is None:
            return None, "Open a volume first."
        nifti, label_map = session.export(app)
        return [str(nifti), str(label_map)], f"Exported **{nifti.name}** and **{label_map.name}**."

    with gr.Blocks(title="sam_peft") as page:
        session = gr.State(None, delete_callback=lambda s: s.close() if s is not None else None)
        gr.Markdown(f"## sam_peft: interactive multi-organ segmentation\nModel: {html.escape(app.note)}",
                    elem_id="model-note")
        with gr.Row():
            with gr.Column(scale=3):
                image = gr.Image(interactive=False, format="png", show_label=False, elem_id="slice-view",
                                 buttons=[])
                z = gr.Slider(0, 1, value=0, step=1, label="axial slice (0 = most inferior)", elem_id="slice")
                status = gr.Markdown(elem_id="status")
            with gr.Column(scale=1):
                upload = gr.File(label=f"open a volume (up to {max_upload_mb:g} MB)", file_types=list(UPLOAD_SUFFIXES),
                                 elem_id="upload")
                example = gr.Button("Open the example CT", elem_id="example")
                window = gr.Radio(list(VIEW_WINDOWS), value="abdomen", label="CT window (view only)", elem_id="window")
                organ = gr.Dropdown(list(app.label_map.organ_names), value=app.label_map.organ_names[0],
                                    label="organ", elem_id="organ")
                mode = gr.Radio(list(MODES), value=MODES[0], label="prompt", elem_id="mode")
                with gr.Row():
                    undo = gr.Button("Undo last prompt", elem_id="undo")
                    clear = gr.Button("Clear organ", elem_id="clear")
                overlay = gr.Checkbox(value=True, label="show overlay", elem_id="overlay")
                reach = gr.Slider(0, 50, value=0, step=1, label="propagate how far (slices each way; 0 = until "
                                  "the organ ends)", elem_id="reach")
                propagate = gr.Button("Propagate through the volume", variant="primary", elem_id="propagate")
                export = gr.Button("Export labels", elem_id="export")
                files = gr.File(label="labels (NIfTI) and label map (JSON)", file_count="multiple",
                                interactive=False, elem_id="downloads")
                legend = gr.HTML(_legend(app, None), elem_id="legend")
        gr.Markdown(HELP)

        shown = [image, legend]
        controls = [session, z, organ, mode, window, overlay]
        upload.upload(on_upload, [session, upload, window, overlay], [session, z, *shown, status])
        example.click(on_example, [session, window, overlay], [session, z, *shown, status])
        for control in (z, window, overlay):
            control.change(view, [session, z, window, overlay], shown)
        image.select(on_click, controls, [session, *shown, status])
        undo.click(act(lambda s, z, organ, _: s.undo(app, z, organ)), controls, [session, *shown, status])
        clear.click(act(lambda s, z, organ, _: s.clear(app, organ)), controls, [session, *shown, status])
        propagate.click(on_propagate, [*controls, reach], [session, *shown, status])
        export.click(on_export, [session], [files, status])
    return page

