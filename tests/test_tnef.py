"""Outlook's winmail.dat (issue 5, section 3): the documents inside are faxed, or the sender learns how to fix Outlook.

- tnef.documents(): real winmail.dat samples (tests/data/tnef, from
  tnefparse) and streams written here; damaged and hostile streams are
  refused quickly as damaged, never with another exception or a hang.
- unwrap_tnef(): the winmail.dat part is replaced by ordinary
  attachments, every other byte of the message stays as it was.
- Over SMTP through a running gateway and the sandbox: the fax that arrives
  carries the documents, the job's history says so, the store keeps the
  message as received; what cannot be unwrapped is refused with a reply that
  says how to set Outlook right.

`winmail()` writes TNEF as MS-OXTNEF describes it (tnefparse only reads):

    stream    = u32 signature 0x223E9F78, u16 legacy key, attribute*
    attribute = u8 level (1 message, 2 attachment), u16 name, u16 type,
                u32 length, data, u16 checksum (sum of the data bytes mod 2^16)

    level 1: attTnefVersion (0x9006), attOemCodepage (0x9007), attMessageClass (0x8008)
    level 2, per attachment: attAttachRendData (0x9002, starts an attachment),
             attAttachTitle (0x8010, short name), attAttachData (0x800F, the file),
             attAttachment (0x9005, MAPI properties: u32 count, then per property
             u16 type, u16 id, value; strings are u32 count, u32 length, bytes
             padded to 4)

All numbers little-endian.
"""

from __future__ import annotations

import email
import email.policy
import struct
import time
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path
from types import SimpleNamespace

import aiosmtplib
import pytest
from conftest import NUMBER, codes_in, fax_message, pdf_bytes

from gateway import store
from gateway.outbound import forward, mime, tnef
from gateway.outbound.winmail import Unwrapped, unwrap_tnef, without_winmail
from gateway.models import MessageFacts
from gateway.errors import TnefError

DATA = Path(__file__).parent / "data" / "tnef"
CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpus"
SENDER = "assistant@clinic.example"
FAX = f"{NUMBER}@greenfax.com"
HOW_TO_FIX = "Compose messages in HTML format"


# --- a TNEF writer --------------------------------------------------------------------------


def attribute(level: int, name: int, kind: int, data: bytes) -> bytes:
    return struct.pack("<BHHI", level, name, kind, len(data)) + data + struct.pack("<H", sum(data) & 0xFFFF)


def _padded(data: bytes) -> bytes:
    return data + b"\x00" * (-len(data) % 4)


def mapi_string(prop: int, text: str) -> bytes:
    encoded = text.encode("cp1252") + b"\x00"
    return struct.pack("<HHII", 0x001E, prop, 1, len(encoded)) + _padded(encoded)


def mapi_long(prop: int, value: int) -> bytes:
    return struct.pack("<HHI", 0x0003, prop, value)


def mapi_bool(prop: int, value: bool) -> bytes:
    return struct.pack("<HHHH", 0x000B, prop, int(value), 0)


def mapi_list(*props: bytes, count: int | None = None) -> bytes:
    return struct.pack("<I", len(props) if count is None else count) + b"".join(props)


@dataclass(frozen=True)
class File:
    name: str
    data: bytes
    mime_tag: str | None = None
    hidden: bool = False
    method: int = 1  # ATTACH_BY_VALUE; 5 an attached Outlook item, 6 an OLE object drawn in the body
    extra_props: tuple[bytes, ...] = ()
    count: int | None = None  # the property count written, if not the true one


def winmail(*files: File, message_props: bytes | None = None, key: int = 0x1234) -> bytes:
    """A TNEF stream as Outlook writes it, with these files attached."""
    out = struct.pack("<IH", tnef.SIGNATURE, key)
    out += attribute(1, 0x9006, 0x0008, struct.pack("<I", 0x00010000))
    out += attribute(1, 0x9007, 0x0006, struct.pack("<II", 1252, 0))
    out += attribute(1, 0x8008, 0x0007, b"IPM.Microsoft Mail.Note\x00")
    if message_props is not None:
        out += attribute(1, 0x9003, 0x0006, message_props)
    for file in files:
        out += attribute(2, 0x9002, 0x0006, struct.pack("<HIHHI", 1, 0xFFFFFFFF, 0, 0, 0))
        out += attribute(2, 0x8010, 0x0001, file.name[:12].encode("cp1252", "replace") + b"\x00")
        out += attribute(2, 0x800F, 0x0006, file.data)
        props = [mapi_string(0x3707, file.name), mapi_long(0x3705, file.method)]
        if file.mime_tag:
            props.append(mapi_string(0x370E, file.mime_tag))
        if file.hidden:
            props.append(mapi_bool(0x7FFE, True))
        out += attribute(2, 0x9005, 0x0006, mapi_list(*props, *file.extra_props, count=file.count))
    return out


def two_pdfs() -> tuple[bytes, bytes, bytes]:
    """A winmail.dat with a 2-page and a 3-page PDF, and the two PDFs."""
    first, second = pdf_bytes(2, marker="first"), pdf_bytes(3, marker="second")
    return winmail(File("Überweisung März.pdf", first, "application/pdf"), File("Befund.pdf", second)), first, second


def outlook_mail(data: bytes, *, text: str = "Please see the attached documents.\r\n", filename: str = "winmail.dat",
                 content_type: tuple[str, str] = ("application", "ms-tnef"), subject: str = "Befund") -> bytes:
    """A mail as Outlook sends it in Rich Text mode: a plain-text body and winmail.dat."""
    msg = EmailMessage()
    msg["From"] = f"Clinic Assistant <{SENDER}>"
    msg["To"] = FAX
    msg["Subject"] = subject
    msg["X-MS-TNEF-Correlator"] = "00000000E4F1CFA1F0D3B3469BBE5C2FC0A1A9B7"
    msg.set_content(text)
    msg.add_attachment(data, maintype=content_type[0], subtype=content_type[1], filename=filename)
    return msg.as_bytes(policy=email.policy.SMTP)


def parts(raw: bytes) -> list[email.message.Message]:
    message = email.message_from_bytes(raw, policy=email.policy.compat32)
    return [part for part in message.walk() if not part.is_multipart()]


# --- tnef.documents ---------------------------------------------------------------------------


def test_a_real_outlook_winmail_dat_yields_its_three_documents():
    found = tnef.documents((DATA / "MAPI_ATTACH_DATA_OBJ.tnef").read_bytes())
    assert [(d.filename, d.content_type, len(d.data)) for d in found] == [
        ("VIA_Nytt_1402.doc", "application/msword", 61534),
        ("VIA_Nytt_1402.pdf", "application/pdf", 213685),
        ("VIA_Nytt_14021.htm", "text/html", 68919),
    ]
    assert found[1].data.startswith(b"%PDF-")


def test_inline_images_of_the_body_are_not_documents_and_non_ascii_names_are_kept():
    found = tnef.documents((DATA / "umlaut.tnef").read_bytes())
    # image003.jpg is hidden: Outlook's signature image, shown by the Rich Text body.
    assert [(d.filename, d.content_type) for d in found] == [
        ("TBZ PARIV GmbH.jpg", "image/jpeg"), ("UmlautAnhang-äüö.txt", "text/plain")]


def test_what_is_not_a_file_is_left_out_or_named_for_the_policy():
    assert tnef.documents((DATA / "body.tnef").read_bytes()) == []  # an HTML body only
    (item,) = tnef.documents((DATA / "IPM-DistList.tnef").read_bytes())
    assert item.content_type == "application/vnd.ms-outlook"  # an attached Outlook item
    files = tnef.documents((DATA / "two-files.tnef").read_bytes())
    assert [(d.filename, d.content_type) for d in files] == [
        ("AUTHORS", "application/octet-stream"), ("README", "application/octet-stream")]


def test_a_written_stream_round_trips_with_types_from_the_tag_or_the_name():
    _data, first, second = two_pdfs()
    drawn = File("Bild 1", b"\x01OLE object drawn in the body", method=6)
    logo = File("image001.png", b"\x89PNG\r\n\x1a\n", "image/png", hidden=True)
    found = tnef.documents(winmail(File("Überweisung März.pdf", first, "application/pdf"), drawn, logo,
                                   File("Befund.pdf", second)))
    assert [(d.filename, d.content_type, d.data) for d in found] == [
        ("Überweisung März.pdf", "application/pdf", first), ("Befund.pdf", "application/pdf", second)]
    names = tnef.documents(winmail(File("..\\..\\Windows\\evil\x07.docx", b"PK\x03\x04"), File("", b"x"),
                                   File("empty.pdf", b""), File("x.pdf", b"%PDF", "multipart/mixed")))
    assert [(d.filename, d.content_type) for d in names] == [
        ("evil.docx", "application/vnd.openxmlformats-officedocument.wordprocessingml.document"),
        ("attachment-2", "application/octet-stream"), ("x.pdf", "application/pdf")]


def outlook_item(inner: bytes) -> File:
    """An attached Outlook item: its own TNEF stream in PR_ATTACH_DATA_OBJ, behind the IMessage signature."""
    value = tnef._IMESSAGE_SIG + inner
    data_obj = struct.pack("<HHII", 0x000D, 0x3701, 1, len(value)) + _padded(value)
    return File("item", b"", method=5, extra_props=(data_obj,))


def hostile_streams() -> dict[str, bytes]:
    """Streams whose counts tnefparse would trust: each would keep it busy for hours, or fill memory."""
    huge = 0xFFFFFFFF
    return {
        "property count": winmail(message_props=mapi_list(count=huge)),
        "multi-valued count": winmail(message_props=struct.pack("<IHHI", 1, 0x1002, 0x0001, huge)),
        "string count": winmail(message_props=struct.pack("<IHHI", 1, 0x001E, 0x0001, huge)),
        "recipient rows": winmail() + attribute(1, 0x9004, 0x0006, struct.pack("<I", huge)),
        "attachment properties": winmail(File("a.pdf", b"%PDF-1.4", count=huge // 8)),
        "inside an Outlook item": winmail(outlook_item(winmail(message_props=mapi_list(count=huge)))),
        "a million tiny objects": winmail() + attribute(1, 0x8099, 0x0006, b"") * (tnef.MAX_ITEMS + 1),
    }


@pytest.mark.parametrize("name", sorted(hostile_streams()))
def test_hostile_counts_are_refused_as_damaged_at_once(name):
    data = hostile_streams()[name]
    started = time.monotonic()
    with pytest.raises(tnef.TnefError) as caught:
        tnef.documents(data)
    assert caught.value.kind == "damaged"
    assert time.monotonic() - started < 0.5


def test_outlook_items_are_read_inside_and_refused_past_a_small_depth():
    data = winmail(File("inner.pdf", b"%PDF-1.4"))
    (item,) = tnef.documents(winmail(outlook_item(data)))
    assert item.content_type == "application/vnd.ms-outlook" and item.data == data
    for _ in range(tnef.MAX_NESTING + 1):
        data = winmail(outlook_item(data))
    with pytest.raises(tnef.TnefError, match="nested too deep"):
        tnef.documents(data)


def test_a_cut_stream_is_damaged_or_yields_only_whole_documents():
    """TNEF has no overall length: a stream cut between two attachments reads as one with fewer.

    Any other cut is damaged, never a document cut short or another error.
    """
    data, _first, _second = two_pdfs()
    small = winmail(File("a.pdf", b"%PDF-1.4 small"), File("b.tif", b"II*\x00tiny"))
    whole = tnef.documents(small)
    assert len(whole) == 2
    read = set()
    for cut in range(len(small)):
        try:
            found = tnef.documents(small[:cut])
        except tnef.TnefError as exc:
            assert exc.kind == "damaged"
        else:
            assert found == whole[:len(found)], cut
            read.add(len(found))
    assert read == {0, 1}  # the cuts between attributes before the first, and between the two, attachments
    assert tnef.documents(small + b"\r\n") == whole  # a line end after the stream, as real files have
    for cut in (len(data) // 3, len(data) // 2, len(data) - 100):
        with pytest.raises(tnef.TnefError):
            tnef.documents(data[:cut])
    for wrong in (b"", b"\x78\x9f\x3e", b"%PDF-1.4\n", b"\x00" * 64):
        with pytest.raises(tnef.TnefError, match="no TNEF signature"):
            tnef.documents(wrong)


def test_the_corpus_winmail_dat_parts_hold_no_document():
    """The six application/ms-tnef parts of the shared corpus (Amazon WorkMail bounces): properties only."""
    paths = sorted(CORPUS.glob("bounces/*/lhost-amazonworkmail-0*.eml"))
    if not paths:
        pytest.skip(f"the shared email corpus is not there ({CORPUS})")
    seen = 0
    for path in paths:
        for part in parts(path.read_bytes().replace(b"\r\n", b"\n")):
            if part.get_content_type() == "application/ms-tnef":
                assert tnef.documents(part.get_payload(decode=True)) == [], path
                seen += 1
    assert seen == 6


# --- unwrap_tnef and inspect -------------------------------------------------------------------


def test_unwrap_replaces_winmail_dat_by_attachments_and_keeps_every_other_byte():
    data, first, second = two_pdfs()
    raw = outlook_mail(data)
    unwrapped = unwrap_tnef(raw)
    assert unwrapped is not None and unwrapped.documents == 2
    assert unwrapped.note == "winmail.dat unwrapped: 2 documents"
    # Up to the winmail.dat part and from its end on, the bytes are the client's.
    start = raw.index(b"Content-Type: application/ms-tnef")
    end = raw.rindex(b"\r\n--")
    assert unwrapped.raw[:start] == raw[:start] and unwrapped.raw.endswith(raw[end:])
    leaves = parts(unwrapped.raw)
    assert [(p.get_content_type(), p.get_filename()) for p in leaves] == [
        ("text/plain", None), ("application/pdf", "Überweisung März.pdf"), ("application/pdf", "Befund.pdf")]
    assert [p.get_payload(decode=True) for p in leaves[1:]] == [first, second]
    assert not email.message_from_bytes(unwrapped.raw, policy=email.policy.default).defects
    assert unwrap_tnef(unwrapped.raw) is None
    assert unwrap_tnef(fax_message()) is None


def test_a_winmail_dat_under_an_encoded_name_and_a_generic_type_is_found_and_unwrapped():
    """The forwarder looks at the parts' types and decoded names, not for "winmail.dat" in the bytes."""
    data, first, second = two_pdfs()
    raw = outlook_mail(data, content_type=("application", "octet-stream"))
    raw = raw.replace(b'"winmail.dat"', b'"=?utf-8?b?d2lubWFpbC5kYXQ=?="')
    assert b"winmail.dat" not in raw.lower() and b"application/ms-tnef" not in raw.lower()
    unwrapped = unwrap_tnef(raw)
    assert unwrapped is not None and unwrapped.documents == 2
    assert [p.get_payload(decode=True) for p in parts(unwrapped.raw)[1:]] == [first, second]
    facts = mime.inspect(raw)
    assert mime.refusal(facts) is None and [a.content_type for a in facts.attachments] == ["application/pdf"] * 2


def test_unwrap_finds_winmail_dat_in_nested_parts_and_as_a_whole_message():
    data, first, second = two_pdfs()
    # multipart/mixed > multipart/mixed > winmail.dat, then an attached message whose body is a winmail.dat.
    inner = outlook_mail(data)
    whole = EmailMessage()
    whole["From"] = SENDER
    whole["Subject"] = "only winmail"
    whole.set_content(data, maintype="application", subtype="ms-tnef", filename="winmail.dat")
    outer = EmailMessage()
    outer["From"] = SENDER
    outer["To"] = FAX
    outer["Subject"] = "nested"
    outer.set_content("cover")
    outer.add_attachment(email.message_from_bytes(inner, policy=email.policy.SMTP))
    outer.add_attachment(email.message_from_bytes(whole.as_bytes(policy=email.policy.SMTP),
                                                  policy=email.policy.SMTP))
    raw = outer.as_bytes(policy=email.policy.SMTP)
    unwrapped = unwrap_tnef(raw)
    assert unwrapped is not None and unwrapped.documents == 4
    pdfs = [p.get_payload(decode=True) for p in parts(unwrapped.raw) if p.get_content_type() == "application/pdf"]
    assert pdfs == [first, second, first, second]
    # The message that was nothing but a winmail.dat is a multipart/mixed now; its other fields stay.
    alone = unwrap_tnef(whole.as_bytes(policy=email.policy.SMTP))
    message = email.message_from_bytes(alone.raw, policy=email.policy.compat32)
    assert message.get_content_type() == "multipart/mixed" and message["Subject"] == "only winmail"
    assert [p.get_filename() for p in parts(alone.raw)] == ["Überweisung März.pdf", "Befund.pdf"]


def test_unwrap_reads_a_mail_without_its_closing_boundary_and_an_octet_stream_winmail_dat():
    data, first, _second = two_pdfs()
    raw = outlook_mail(data, content_type=("application", "octet-stream"))
    cut = raw[:raw.rindex(b"\r\n--")] + b"\r\n"  # no closing delimiter, as 31 corpus mails
    unwrapped = unwrap_tnef(cut)
    assert unwrapped is not None and unwrapped.documents == 2
    assert parts(unwrapped.raw)[1].get_payload(decode=True) == first


def test_inspect_lists_the_documents_inside_and_names_what_cannot_be_unwrapped():
    data, _first, _second = two_pdfs()
    facts = mime.inspect(outlook_mail(data))
    assert [(a.content_type, a.filename) for a in facts.attachments] == [
        ("application/pdf", "Überweisung März.pdf"), ("application/pdf", "Befund.pdf")]
    assert tnef.refusal(facts) is None
    for kind, winmail_dat in (("damaged", data[:200]), ("empty", (DATA / "body.tnef").read_bytes())):
        facts = mime.inspect(outlook_mail(winmail_dat))
        assert f"tnef-{kind}" in facts.defects
        refusal = tnef.refusal(facts)
        assert refusal is not None and refusal.check == "tnef"
        assert (refusal.reply.code, refusal.reply.enhanced) == (554, "5.6.3")
        assert "winmail.dat (Outlook Rich Text)" in refusal.reply.text and HOW_TO_FIX in refusal.reply.text
    assert tnef.refusal(MessageFacts()) is None


# --- over SMTP, through the gateway and the sandbox ---------------------------------------------


async def submit(port: int, message: bytes) -> tuple[int, str]:
    """One transaction; the reply to its data (or to the first command refused)."""
    try:
        async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False) as client:
            _errors, reply = await client.sendmail(SENDER, [FAX], message)
            return 250, reply
    except aiosmtplib.SMTPResponseException as exc:
        return exc.code, exc.message


async def test_an_outlook_rich_text_fax_goes_out_with_its_documents_and_the_history_says_so(gateway, sandbox):
    gw = await gateway()
    data, first, second = two_pdfs()
    message = outlook_mail(data)
    code, reply = await submit(gw.port, message)
    assert code == 250, reply
    (job_code,) = codes_in(reply)
    (fax,) = await sandbox.wait_for(1)
    assert fax.code == job_code and fax.pages == 5  # 2 + 3 PDF pages: the documents arrived
    leaves = parts(fax.raw)
    assert [(p.get_content_type(), p.get_filename()) for p in leaves] == [
        ("text/plain", None), ("application/pdf", "Überweisung März.pdf"), ("application/pdf", "Befund.pdf")]
    assert [p.get_payload(decode=True) for p in leaves[1:]] == [first, second]
    assert b"winmail.dat" not in fax.raw and b"ms-tnef" not in fax.raw
    job = await gw.wait_state(job_code, "submitted")
    events = [(e["source"], e["state"], e["detail"]) for e in job["events"]]
    assert ("forwarder", None, "winmail.dat unwrapped: 2 documents") in events
    assert events.index(("forwarder", None, "winmail.dat unwrapped: 2 documents")) < len(events) - 1
    # The store keeps what the client sent; only the copy sent upstream is rewritten.
    conn = store.connect(gw.store_path, readonly=True)
    try:
        (stored,) = conn.execute("SELECT raw FROM messages").fetchone()
    finally:
        conn.close()
    assert stored == message


async def test_a_real_winmail_dat_sample_is_faxed_as_its_three_documents(gateway, sandbox):
    gw = await gateway()
    code, reply = await submit(gw.port, outlook_mail((DATA / "MAPI_ATTACH_DATA_OBJ.tnef").read_bytes()))
    assert code == 250, reply
    (fax,) = await sandbox.wait_for(1)
    assert [p.get_filename() for p in parts(fax.raw)] == [
        None, "VIA_Nytt_1402.doc", "VIA_Nytt_1402.pdf", "VIA_Nytt_14021.htm"]
    (job_code,) = codes_in(reply)
    job = await gw.wait_state(job_code, "submitted")
    assert any(e["detail"] == "winmail.dat unwrapped: 3 documents" for e in job["events"])


async def test_what_cannot_be_unwrapped_is_refused_with_how_to_fix_outlook(gateway, sandbox):
    gw = await gateway()
    data, _first, _second = two_pdfs()
    damaged = outlook_mail(data[: len(data) // 2])
    nothing_inside = outlook_mail((DATA / "body.tnef").read_bytes())
    for message, problem in ((damaged, "is damaged"), (nothing_inside, "holds no document to fax")):
        code, reply = await submit(gw.port, message)
        assert code == 554, reply
        assert reply.startswith("5.6.3 The attachment winmail.dat (Outlook Rich Text) ") and problem in reply
        assert "send the email as HTML or plain text (Outlook: File > Options > Mail > Compose messages in" \
               " HTML format) so the documents are attached as they are" in reply
    # Documents inside that cannot be faxed are refused by the content policy, by name.
    code, reply = await submit(gw.port, outlook_mail((DATA / "two-files.tnef").read_bytes()))
    assert code == 554 and "AUTHORS" in reply and "application/octet-stream" in reply, reply
    code, reply = await submit(gw.port, outlook_mail((DATA / "IPM-DistList.tnef").read_bytes()))
    assert code == 554 and "application/vnd.ms-outlook" in reply, reply
    # Nothing was stored; the gateway still takes faxes.
    conn = store.connect(gw.store_path, readonly=True)
    try:
        assert conn.execute("SELECT COUNT(*) FROM messages").fetchone()[0] == 0
    finally:
        conn.close()
    code, reply = await submit(gw.port, fax_message())
    assert code == 250, reply


async def test_the_corpus_winmail_dat_is_refused_as_holding_no_document(gateway):
    path = CORPUS / "bounces" / "bsd" / "lhost-amazonworkmail-01.eml"
    if not path.is_file():
        pytest.skip(f"the shared email corpus is not there ({CORPUS})")
    (part,) = [p for p in parts(path.read_bytes()) if p.get_content_type() == "application/ms-tnef"]
    gw = await gateway()
    code, reply = await submit(gw.port, outlook_mail(part.get_payload(decode=True)))
    assert code == 554 and "holds no document to fax" in reply, reply


async def test_a_winmail_dat_that_fails_at_send_time_is_held_never_sent_blank(gateway, sandbox, monkeypatch):
    """Only a changed library could make the send-time unwrap fail after the intake's succeeded."""
    gw = await gateway()

    def fails(raw: bytes) -> Unwrapped | None:
        raise tnef.TnefError("damaged", "the winmail.dat is damaged (simulated)")

    # Only the forwarder's view of winmail.py changes; the intake still unwraps (and so accepts) as always.
    monkeypatch.setattr(forward, "winmail", SimpleNamespace(unwrap_tnef=fails, without_winmail=without_winmail))
    data, _first, _second = two_pdfs()
    code, reply = await submit(gw.port, outlook_mail(data))
    assert code == 250, reply
    (job_code,) = codes_in(reply)
    job = await gw.wait_state(job_code, "held")
    assert "winmail.dat cannot be unwrapped" in job["reason"]
    assert sandbox.faxes == []
