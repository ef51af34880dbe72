"""The Slack side of handlers.output.Output: Block Kit through slack_sdk's WebClient, answers through Bolt's respond."""

from __future__ import annotations

from typing import Any

from slack_sdk import WebClient

from bot import blocks, home
from handlers.output import Posted, Upload
from handlers.results import Form, HomeTab, RejectForm, Result


class SlackOutput:
    """One person's conversation in Slack. Without a response_url (a form submission, the worker), answers that
    only they see go through chat.postEphemeral in `channel`."""

    def __init__(self, client: WebClient, respond: Any = None, user: str | None = None, channel: str | None = None,
                 trigger_id: str | None = None) -> None:
        self.client, self.respond, self.user, self.channel, self.trigger_id = client, respond, user, channel, trigger_id

    def post(self, channel: str, message: Result, thread_ts: str | None = None) -> Posted:
        shown = blocks.render(message)
        answer = self.client.chat_postMessage(channel=channel, text=shown.text, blocks=shown.blocks,
                                              thread_ts=thread_ts, unfurl_links=False)
        posted = Posted(answer["channel"], answer["ts"])
        if shown.attachment is not None:  # what did not fit Slack's limits: the thread, as a file
            self.client.chat_postMessage(channel=posted.channel, thread_ts=posted.ts,
                                         text="Full diff attached as a file.")
            self.upload(posted.channel, shown.attachment, thread_ts=posted.ts)
        return posted

    def update(self, channel: str, ts: str, message: Result) -> None:
        shown = blocks.render(message)
        self.client.chat_update(channel=channel, ts=ts, text=shown.text, blocks=shown.blocks)

    def ephemeral(self, message: Result) -> None:
        shown = blocks.render(message)
        if self.respond is not None:
            self.respond(text=shown.text, blocks=shown.blocks, response_type="ephemeral", replace_original=False)
        else:
            self.client.chat_postEphemeral(channel=self.channel or "", user=self.user or "", text=shown.text,
                                           blocks=shown.blocks)

    def upload(self, channel: str, upload: Upload, thread_ts: str | None = None) -> None:
        comment = blocks.render(upload.comment).text if upload.comment is not None else None
        self.client.files_upload_v2(channel=channel, thread_ts=thread_ts, filename=upload.filename,
                                    title=upload.title, initial_comment=comment,
                                    **({"file": upload.data} if upload.data is not None else {"content": upload.content}))

    def open_form(self, form: Form) -> None:
        view = blocks.reject_modal(form) if isinstance(form, RejectForm) else blocks.try_modal(form)
        self.client.views_open(trigger_id=self.trigger_id or "", view=view)

    def publish_home(self, user: str, page: HomeTab) -> None:
        self.client.views_publish(user_id=user, view=home.home_view(page))
