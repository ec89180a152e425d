"""Rebuild the shipped calibration / held-out data from its sources (a development script, run once).

    apt-get install -y espeak-ng sox pocketsphinx-testdata
    python calibration/data/make_data.py

Writes calib/, heldout/, calib.jsonl, heldout.jsonl, tokenizer_corpus.txt and
SOURCES.md next to this file. Photos come from scikit-image's bundled
``skimage.data`` (public domain / CC0, per each loader's docstring), read
speech from Debian's pocketsphinx-testdata (LibriVox, public domain), spoken
commands are synthesised with espeak-ng from text written for this project.
Every prompt below was written for this project.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.io import wavfile

HERE = Path(__file__).resolve().parent
LIBRIVOX = Path("/usr/share/pocketsphinx/test/data/librivox")
SHORT_SIDE = 224
JPEG_QUALITY = 85
MAX_SPEECH_S = 4.0

# Licence of each skimage.data photo, as its loader's docstring states it (scikit-image 0.26).
PHOTO_LICENCE = {
    "astronaut": "public domain (NASA; 'No known copyright restrictions, released into the public domain')",
    "chelsea": "CC0 (photographer Stefan van der Walt)",
    "coffee": "CC0 (photographer Rachel Michetti)",
    "rocket": "public domain (SpaceX photos released into the public domain)",
    "camera": "CC0 (photographer Lav Varshney)",
    "clock": "public domain (released by the photographer, Stefan van der Walt)",
    "brick": "CC0 (CC0Textures Bricks25)",
    "grass": "CC0 (DeviantArt linolafett, Grass-01)",
    "gravel": "CC0 (CC0Textures Gravel04)",
    "hubble_deep_field": "public domain (NASA / HubbleSite)",
    "retina": "CC0 1.0 (Wikimedia Commons, Fundus photograph of normal left eye)",
    "cell": "CC0 (quantitative phase image, dedicated to the public domain)",
    "text": "public domain (Wikipedia File:Corner.png)",
}

# name -> (skimage.data loader, crop box as fractions (left, top, right, bottom) or None)
IMAGES = {
    "calib": {
        "chelsea": ("chelsea", None),
        "chelsea_face": ("chelsea", (0.25, 0.0, 0.85, 0.95)),
        "chelsea_eyes": ("chelsea", (0.30, 0.10, 0.80, 0.50)),
        "coffee": ("coffee", None),
        "coffee_cup": ("coffee", (0.10, 0.0, 0.70, 0.90)),
        "coffee_table": ("coffee", (0.55, 0.0, 1.0, 0.60)),
        "camera": ("camera", None),
        "camera_man": ("camera", (0.45, 0.0, 1.0, 0.75)),
        "camera_field": ("camera", (0.0, 0.60, 1.0, 1.0)),
        "clock": ("clock", None),
        "clock_face": ("clock", (0.25, 0.20, 0.75, 0.80)),
        "hubble": ("hubble_deep_field", None),
        "hubble_top_left": ("hubble_deep_field", (0.0, 0.0, 0.5, 0.5)),
        "hubble_bottom_right": ("hubble_deep_field", (0.5, 0.5, 1.0, 1.0)),
        "retina": ("retina", None),
        "retina_disc": ("retina", (0.0, 0.30, 0.40, 0.70)),
        "retina_centre": ("retina", (0.30, 0.30, 0.70, 0.70)),
        "brick": ("brick", None),
        "brick_detail": ("brick", (0.20, 0.20, 0.70, 0.70)),
        "grass": ("grass", None),
        "text": ("text", None),
        "text_left": ("text", (0.0, 0.0, 0.55, 1.0)),
    },
    "heldout": {
        "astronaut": ("astronaut", None),
        "astronaut_face": ("astronaut", (0.25, 0.0, 0.60, 0.40)),
        "rocket": ("rocket", None),
        "rocket_pad": ("rocket", (0.30, 0.0, 0.85, 1.0)),
        "cell": ("cell", None),
        "cell_detail": ("cell", (0.40, 0.45, 0.95, 1.0)),
        "gravel": ("gravel", None),
    },
}

# name -> ("espeak", text, voice, words per minute, format) or ("librivox", original id, part index)
# format: "16k" mono 16-bit, "44k1-stereo" 16-bit, "8k" mono 16-bit, "22k05-24bit" mono 24-bit.
AUDIO = {
    "calib": {
        "open_camera": ("espeak", "Open the camera.", "en-us", 160, "16k"),
        "call_mom": ("espeak", "Call mom.", "en-gb+f3", 150, "16k"),
        "timer": ("espeak", "Set a timer for ten minutes.", "en-us+m3", 165, "16k"),
        "flashlight": ("espeak", "Turn on the flashlight.", "en-gb-scotland", 155, "16k"),
        "weather": ("espeak", "What's the weather like tomorrow?", "en-us+f2", 160, "44k1-stereo"),
        "on_my_way": ("espeak", "Send a message to John saying I'm on my way.", "en-029", 170, "8k"),
        "jazz": ("espeak", "Play some jazz in the living room.", "en-gb-x-rp", 160, "22k05-24bit"),
        "volume": ("espeak", "Turn the volume down a little.", "en-us-nyc", 150, "16k"),
        "milk": ("espeak", "Remind me to buy milk at five p.m.", "en-gb+f4", 160, "16k"),
        "bluetooth": ("espeak", "Turn off Bluetooth and Wi-Fi.", "en-us+m1", 165, "16k"),
        "notification": ("espeak", "Read my latest notification out loud.", "en-gb-x-gbcwmd", 155, "16k"),
        "share_sister": ("espeak", "Share this photo with my sister.", "en-us+f3", 160, "16k"),
        "which_animal": ("espeak", "What kind of animal is this?", "en-gb", 150, "16k"),
        "black_white": ("espeak", "Make this picture black and white.", "en-us+m4", 160, "16k"),
        "how_many_cups": ("espeak", "How many cups are on the table?", "en-gb-x-gbclan", 155, "16k"),
        "favourites": ("espeak", "Save this image to my favourites.", "en-us+f1", 165, "16k"),
        "day_or_night": ("espeak", "Is it day or night in this picture?", "en-gb+m2", 160, "16k"),
        "austen_0870_a": ("librivox", "sense_and_sensibility_01_austen_64kb-0870", 0),
        "austen_0870_b": ("librivox", "sense_and_sensibility_01_austen_64kb-0870", 1),
        "austen_0880": ("librivox", "sense_and_sensibility_01_austen_64kb-0880", 0),
        "austen_0890_a": ("librivox", "sense_and_sensibility_01_austen_64kb-0890", 0),
        "austen_0890_b": ("librivox", "sense_and_sensibility_01_austen_64kb-0890", 1),
    },
    "heldout": {
        "calculator": ("espeak", "Open the calculator.", "en-us+f2", 155, "16k"),
        "next_meeting": ("espeak", "What time is my next meeting?", "en-gb+f3", 160, "16k"),
        "holding": ("espeak", "What is the person in this photo holding?", "en-us", 155, "16k"),
        "send_dad": ("espeak", "Send this picture to dad.", "en-gb-scotland", 160, "16k"),
        "austen_0920_a": ("librivox", "sense_and_sensibility_01_austen_64kb-0920", 0),
        "austen_0920_b": ("librivox", "sense_and_sensibility_01_austen_64kb-0920", 1),
        "austen_0930": ("librivox", "sense_and_sensibility_01_austen_64kb-0930", 0),
    },
}

# (prompt, image name or None, audio name or None); every prompt written for this project.
SAMPLES = {
    "calib": [
        # text only
        ("Open the settings app and turn on Wi-Fi.", None, None),
        ("Set an alarm for 6:30 tomorrow morning.", None, None),
        ("Send a text to Maria saying I'll be ten minutes late.", None, None),
        ("Open the calendar and add a dentist appointment on Friday at 2 pm.", None, None),
        ("Turn the screen brightness down to 40 percent.", None, None),
        ("Search the web for the weather in Lisbon this weekend.", None, None),
        ('Play my "Morning Run" playlist on shuffle.', None, None),
        ("Turn on Do Not Disturb until 8 am.", None, None),
        ("Find the nearest pharmacy that is open now and start navigation.", None, None),
        ("Take a screenshot and share it with Sam on WhatsApp.", None, None),
        ('Reply to the last email from the bank with "Thanks, received."', None, None),
        ("Uninstall the app I used least this month.", None, None),
        ("Switch the phone to dark mode.", None, None),
        ("Order a large pepperoni pizza for delivery at 7 pm.", None, None),
        ("How much battery is left, and which app used the most today?", None, None),
        ("Scroll down on this page and tap the second search result.", None, None),
        ('Create a note titled "Groceries" with eggs, milk, rice and coffee.', None, None),
        ('Connect to the Bluetooth headphones named "Pixel Buds".', None, None),
        ("Call Zoë's mobile number and put it on speaker.", None, None),
        ("Convert 25 € to US dollars and copy the result.", None, None),
        # image + text
        ("What is in this photo?", "chelsea", None),
        ("Describe the animal in this picture in one sentence.", "chelsea_face", None),
        ("What colour are the cat's eyes?", "chelsea_eyes", None),
        ("What drink is in the cup, and what is next to it?", "coffee", None),
        ("Write a short caption for this photo for my food blog.", "coffee_cup", None),
        ("Is this picture taken indoors or outdoors?", "camera", None),
        ("What is the man in this photo doing?", "camera_man", None),
        ("What time does the clock show?", "clock", None),
        ("Is this image blurry? If so, how should I retake it?", "clock_face", None),
        ("Explain what this photo shows to someone who cannot see it.", "hubble", None),
        ("How many bright objects can you count in this picture?", "hubble_top_left", None),
        ("What kind of camera might have taken this picture?", "retina", None),
        ("Describe the shapes and colours in this close-up.", "retina_disc", None),
        ("Describe the texture in this photo.", "brick", None),
        ("Suggest three tags for this picture for my gallery.", "grass", None),
        ("Read any text you can see in this image.", "text", None),
        # audio + text
        ("Do what the voice message asks.", None, "open_camera"),
        ("Carry out the spoken command.", None, "call_mom"),
        ("Listen to this and set up what it mentions.", None, "timer"),
        ("What is the speaker asking me to do?", None, "flashlight"),
        ("Answer the question in the recording.", None, "weather"),
        ("Turn this voice memo into a text message draft.", None, "on_my_way"),
        ("Follow the voice instruction and tell me which app you used.", None, "jazz"),
        ("Repeat what was said, word for word.", None, "volume"),
        ("Write down the instruction from the audio as a to-do item.", None, "milk"),
        ("Which settings does the voice note want changed?", None, "bluetooth"),
        ("Is the speech in this clip clear enough to understand?", None, "notification"),
        ("Transcribe this voice note.", None, "austen_0870_a"),
        ("Transcribe the recording and then summarise it in five words.", None, "austen_0870_b"),
        ("Who is the speaker talking about in this clip?", None, "austen_0880"),
        ("What language is spoken in this recording?", None, "austen_0890_a"),
        ("How many sentences does the speaker say?", None, "austen_0890_b"),
        # image + audio + text
        ("Look at the photo and follow the spoken instruction.", "coffee_table", "share_sister"),
        ("Answer the question in the voice message about this picture.", "camera_field", "which_animal"),
        ("Listen to the request and apply it to this picture.", "brick_detail", "black_white"),
        ("Does the voice note match what is shown in the image?", "retina_centre", "how_many_cups"),
        ("The recording says what to do with this image; do it.", "hubble_bottom_right", "favourites"),
        ("Use the audio and the photo together to answer.", "text_left", "day_or_night"),
    ],
    "heldout": [
        # text only
        ("Go back to the home screen and open the camera app.", None, None),
        ("Turn off mobile data while I am roaming.", None, None),
        ("Remind me to water the plants every Sunday at 10.", None, None),
        ("Mute all notifications from the shopping app.", None, None),
        ("Send «bonne nuit» to Élodie.", None, None),
        # image + text
        ("Who is in the photo and what are they wearing?", "astronaut_face", None),
        ("Write alt text for this image.", "rocket_pad", None),
        ("What is shown in this image? Answer briefly.", "rocket", None),
        ("Is there anyone visible in this picture?", "cell", None),
        ("What is the main colour of the surface in this photo?", "gravel", None),
        # audio + text
        ("Follow the instruction in this audio clip.", None, "calculator"),
        ("Check my calendar and answer the spoken question.", None, "next_meeting"),
        ("What does the voice recording say?", None, "austen_0920_a"),
        ("Summarise the spoken sentence.", None, "austen_0920_b"),
        ("Whose character does the reader describe?", None, "austen_0930"),
        # image + audio + text
        ("Look at the picture and answer the spoken question.", "astronaut", "holding"),
        ("Do what the voice note says with this photo.", "cell_detail", "send_dad"),
    ],
}

# Extra English for the tiny tokenizer, written for this project.
CORPUS_PROSE = """\
The assistant runs on the phone itself. It reads the screen, listens to the user, looks at photos and then taps, types and scrolls on the user's behalf. Every request is short: open an app, change a setting, send a message, find a place, play a song.

Open the settings app. Tap Network and internet, then Wi-Fi, and switch it on. Choose the home network and type the password. Go back to the home screen when you are done.

Open the messages app and start a new conversation. Type the name of the contact, write the message and press send. If the contact has two numbers, ask which one to use.

Open the camera, switch to the front camera and take a photo. Open the gallery, select the last three pictures and share them by email. Delete the blurry ones after asking first.

Set an alarm for seven o'clock on weekdays. Turn on the timer for twenty minutes. Add a reminder to call the doctor tomorrow afternoon. Create a calendar event for the team meeting next Tuesday at half past nine.

Search for a coffee shop nearby, show the reviews, and start walking directions. How long will it take by bus? Book a table for two people at eight in the evening.

Turn the volume up, mute the ringer, enable airplane mode, turn off location services, check the battery level and lower the screen brightness. Connect the headphones over Bluetooth and play the next episode of the podcast.

What is in this picture? Describe the photo. Read the text on the sign. How many people are in the image? What colour is the car? Is the cat asleep? Which room of the house is this?

Listen to the voice note and write it down. Reply to the voice message with a short text. Translate the spoken sentence into Spanish, French, German, Chinese or Japanese.

Spoken commands used for the audio samples: Open the camera. Call mom. Set a timer for ten minutes. Turn on the flashlight. What's the weather like tomorrow? Send a message to John saying I'm on my way. Play some jazz in the living room. Turn the volume down a little. Remind me to buy milk at five p.m. Turn off Bluetooth and Wi-Fi. Read my latest notification out loud. Share this photo with my sister. What kind of animal is this? Make this picture black and white. How many cups are on the table? Save this image to my favourites. Is it day or night in this picture? Open the calculator. What time is my next meeting? What is the person in this photo holding? Send this picture to dad.
"""

CORPUS_PYDOC_CHARS = 160_000  # enough English for 2048 merged tokens


def _resize_short_side(im: Image.Image, short: int) -> Image.Image:
    w, h = im.size
    s = short / min(w, h)
    return im.resize((max(1, round(w * s)), max(1, round(h * s))), Image.Resampling.LANCZOS)


def make_image(source: str, box: tuple[float, float, float, float] | None, dest: Path) -> tuple[int, int]:
    import skimage.data

    a = getattr(skimage.data, source)()
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    im = Image.fromarray(a)
    if box is not None:
        w, h = im.size
        im = im.crop((round(box[0] * w), round(box[1] * h), round(box[2] * w), round(box[3] * h)))
    im = _resize_short_side(im, SHORT_SIDE)
    im.save(dest, "JPEG", quality=JPEG_QUALITY, optimize=True)
    return im.size


def _run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True)


def make_espeak(text: str, voice: str, wpm: int, fmt: str, dest: Path) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        raw, clean = Path(tmp) / "raw.wav", Path(tmp) / "clean.wav"
        _run("espeak-ng", "-v", voice, "-s", str(wpm), "-w", str(raw), text)
        # trim leading/trailing silence, pad 0.1 s, peak-normalise to -3 dBFS (still 22.05 kHz)
        _run("sox", "-D", str(raw), str(clean), "silence", "1", "0.02", "0.3%", "reverse", "silence", "1", "0.02",
             "0.3%", "reverse", "pad", "0.1", "0.1", "norm", "-3")
        if fmt == "16k":
            _run("sox", "-D", str(clean), "-r", "16000", "-c", "1", "-b", "16", str(dest))
            return "16 kHz mono 16-bit"
        if fmt == "8k":
            _run("sox", "-D", str(clean), "-r", "8000", "-c", "1", "-b", "16", str(dest))
            return "8 kHz mono 16-bit"
        if fmt == "22k05-24bit":
            _run("sox", "-D", str(clean), "-r", "22050", "-c", "1", "-b", "24", str(dest))
            return "22.05 kHz mono 24-bit"
        if fmt == "44k1-stereo":
            # right channel 0.8x the left, so a downmix is not a copy of one channel
            _run("sox", "-D", str(clean), "-r", "44100", "-b", "16", str(dest), "remix", "1", "1v0.8")
            return "44.1 kHz stereo 16-bit (right channel at 0.8x)"
    raise ValueError(f"unknown audio format {fmt}")


def _librivox_parts(wave: np.ndarray, sr: int) -> list[tuple[int, int]]:
    """Split read speech into parts of <= MAX_SPEECH_S at the quietest 20 ms inside the allowed window."""
    n, limit = len(wave), int(MAX_SPEECH_S * sr)
    if n <= limit:
        return [(0, n)]
    assert n <= 2 * limit, "two parts must suffice"
    hop = sr // 50
    lo, hi = n - limit, limit  # split point s with s <= limit and n - s <= limit
    x = wave.astype(np.float64)
    best = min(range(lo, hi - hop, hop), key=lambda s: float(np.mean(x[s : s + hop] ** 2)))
    cut = best + hop // 2
    return [(0, cut), (cut, n)]


def make_librivox(file_id: str, part: int, dest: Path) -> str:
    sr, wave = wavfile.read(LIBRIVOX / f"{file_id}.wav")
    assert sr == 16000 and wave.dtype == np.int16 and wave.ndim == 1
    start, end = _librivox_parts(wave, sr)[part]
    wavfile.write(dest, sr, wave[start:end])
    return f"16 kHz mono 16-bit, samples {start}..{end} ({start / sr:.2f}-{end / sr:.2f} s)"


def librivox_transcripts() -> dict[str, str]:
    out = {}
    for line in (LIBRIVOX / "transcription").read_text().splitlines():
        text, _, fid = line.rpartition("(")
        out[fid.strip(" )")] = text.replace("<s>", "").replace("</s>", "").strip()
    return out


def pydoc_excerpt(chars: int) -> str:
    from pydoc_data.topics import topics

    parts: list[str] = []
    for key in sorted(topics):
        parts.append(topics[key].strip())
        if sum(map(len, parts)) >= chars:
            break
    return "\n\n".join(parts)


def main() -> None:
    import platform

    import skimage

    rows: list[tuple[str, str, str, str]] = []  # file, origin, how made, licence
    transcripts = librivox_transcripts()
    for split in ("calib", "heldout"):
        folder = HERE / split
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        for name, (source, box) in IMAGES[split].items():
            w, h = make_image(source, box, folder / f"{name}.jpg")
            crop = f"crop {box} of the original, " if box else ""
            rows.append((f"{split}/{name}.jpg", f"scikit-image {skimage.__version__} `skimage.data.{source}()`",
                         f"{crop}resized to {w}x{h} (short side {SHORT_SIDE}, Lanczos), JPEG q{JPEG_QUALITY}",
                         PHOTO_LICENCE[source]))
        for name, spec in AUDIO[split].items():
            dest = folder / f"{name}.wav"
            if spec[0] == "espeak":
                _, text, voice, wpm, fmt = spec
                how = make_espeak(text, voice, wpm, fmt, dest)
                rows.append((f"{split}/{name}.wav", "synthesised with Debian espeak-ng "
                             f"(`espeak-ng -v {voice} -s {wpm}`) from our text \"{text}\"",
                             f"sox: silence trimmed, 0.1 s padding, peak -3 dBFS; {how}",
                             "CC0 (generated for this project; the text is ours)"))
            else:
                _, fid, part = spec
                how = make_librivox(fid, part, dest)
                rows.append((f"{split}/{name}.wav", f"Debian pocketsphinx-testdata `librivox/{fid}.wav` "
                             f"(LibriVox, Sense and Sensibility ch. 1; full line: \"{transcripts[fid]}\")",
                             f"part {part + 1}, {how}", "public domain (LibriVox recording)"))
        with open(HERE / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for i, (text, image, audio) in enumerate(SAMPLES[split], 1):
                item = {"id": f"{split}-{i:03d}", "text": text}
                if image:
                    assert image in IMAGES[split], image
                    item["image"] = f"{split}/{image}.jpg"
                if audio:
                    assert audio in AUDIO[split], audio
                    item["audio"] = f"{split}/{audio}.wav"
                f.write(json.dumps(item, ensure_ascii=False) + "\n")

    excerpt = pydoc_excerpt(CORPUS_PYDOC_CHARS)
    (HERE / "tokenizer_corpus.txt").write_text(CORPUS_PROSE + "\n" + excerpt + "\n", encoding="utf-8")
    rows.append(("tokenizer_corpus.txt", "our own prose (first section), then the first topics in sorted order "
                 f"of Python {platform.python_version()} `pydoc_data.topics` (the language reference text)",
                 "training text of exporter/model/tiny_tokenizer.json, with the manifests' prompts",
                 "ours: CC0; the Python documentation excerpt: PSF License Version 2 (Python Software Foundation)"))
    rows.append(("calib.jsonl", "written for this project", "calibration manifest; prompts are ours", "CC0"))
    rows.append(("heldout.jsonl", "written for this project", "held-out (parity) manifest; prompts are ours", "CC0"))
    rows.append(("make_data.py", "written for this project", "rebuilds every file listed here", "MIT (project)"))

    lines = [
        "# Shipped calibration and held-out data: sources and licences",
        "",
        "Rebuilt by `python calibration/data/make_data.py` (needs `apt-get install espeak-ng sox "
        "pocketsphinx-testdata` and scikit-image). The calibration set (`calib/`, `calib.jsonl`) and the held-out "
        "parity set (`heldout/`, `heldout.jsonl`) share no file, no source photo, no source recording and no prompt.",
        "",
        "Photo licences are quoted from each `skimage.data` loader's docstring; scikit-image itself is BSD-3-Clause. "
        "LibriVox recordings are in the public domain; the pocketsphinx-testdata package that carries them is "
        "BSD-2-Clause (CMU). espeak-ng's output is speech generated here from text written for this project.",
        "",
        "| file | origin | how it was made | licence |",
        "|---|---|---|---|",
    ]
    lines += [f"| `{a}` | {b} | {c} | {d} |" for a, b, c, d in rows]
    (HERE / "SOURCES.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
