"""Regenerate tests/fancy-HTML-to-smt.eml (~19 KB) and tests/avocado-577k.eml (~577 KB).

Run from the repository root: python3 tests/support/make_fixtures.py (deterministic output)."""
import base64, quopri, random, struct, zlib, textwrap
random.seed(42)
para = ("Avocados are a nutrient-dense fruit. Rich in monounsaturated fats, fibre, potassium and "
        "vitamins C, E, K and B6, the humble avocado has become the centrepiece of brunch menus "
        "everywhere. Here is our guide to choosing, ripening, storing and enjoying them. ")
rows = []
for i in range(24):
    rows.append('<tr><td class="card" style="padding:16px;font-family:Helvetica,Arial,sans-serif;'
                'font-size:15px;line-height:22px;color:#2f4f2f;">'
                '<h2 style="margin:0 0 8px 0;color:#568203;">Tip %d: the perfect avocado</h2>'
                '<p style="margin:0;">%s</p>'
                '<a href="https://www.example.com/avocado/tips/%d?utm_source=smime" '
                'style="color:#568203;">Read more</a></td></tr>' % (i + 1, para, i + 1))
html = ('<!DOCTYPE html><html><head><meta charset="utf-8"><title>Avocado news</title>'
        '<style>body{margin:0;background:#f4f9ec}.card{border-bottom:1px solid #d8e8c0}</style>'
        '</head><body><table width="100%" cellpadding="0" cellspacing="0" role="presentation">'
        '<tr><td style="background:#568203;color:#fff;font-size:28px;padding:24px;">'
        'Avocado Weekly</td></tr>' + "\n".join(rows) +
        '<tr><td style="font-size:11px;color:#888;padding:16px;">You are receiving this test '
        'message from the sparkpostSMIME project.</td></tr></table></body></html>\n')
text = "Avocado Weekly\n\n" + "\n\n".join(textwrap.fill("Tip %d: the perfect avocado. %s" % (i + 1, para), 72) for i in range(12)) + "\n"

def qp(s):
    return quopri.encodestring(s.encode("utf-8")).decode("ascii").replace("\n", "\r\n")

head = ("From: Steve Tuck <steve@thetucks.com>\r\n"
        "To: Steve Tuck <steve.tuck@sparkpost.com>\r\n"
        "Subject: Avocado Weekly - fancy HTML test message\r\n"
        "Date: Mon, 02 Nov 2026 10:00:00 +0000\r\n"
        "Message-ID: <avocado-%s@thetucks.com>\r\n"
        "MIME-Version: 1.0\r\n")
def alt(b):
    return ('Content-Type: multipart/alternative; boundary="%s"\r\n\r\n'
            '--%s\r\nContent-Type: text/plain; charset="utf-8"\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n%s\r\n'
            '--%s\r\nContent-Type: text/html; charset="utf-8"\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n%s\r\n'
            '--%s--\r\n') % (b, b, qp(text), b, qp(html), b)
small = head % "19k" + alt("avocado-alt-1")
open("tests/fancy-HTML-to-smt.eml", "wb").write(small.encode())

# ~577 KB: the same plus a PNG of noise, base64
w, h = 300, 451
raw = b"".join(b"\x00" + bytes(random.getrandbits(8) for _ in range(w * 3)) for _ in range(h))
def chunk(t, d):
    return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xffffffff)
png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
b64 = base64.encodebytes(png).decode().replace("\n", "\r\n")
big = (head % "577k").replace("fancy HTML test message", "with attachment") + \
      'Content-Type: multipart/mixed; boundary="avocado-mixed-1"\r\n\r\nThis is a multi-part message in MIME format.\r\n\r\n--avocado-mixed-1\r\n' + \
      alt("avocado-alt-2") + '\r\n--avocado-mixed-1\r\nContent-Type: image/png; name="avocado.png"\r\nContent-Disposition: attachment; filename="avocado.png"\r\nContent-Transfer-Encoding: base64\r\n\r\n' + b64 + '--avocado-mixed-1--\r\n'
open("tests/avocado-577k.eml", "wb").write(big.encode())
