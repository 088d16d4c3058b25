/// Text from a store (names, paths, reasons in records) made safe for a terminal.
///
/// A record is written by whoever could write the file, so its text may carry escape sequences
/// that rewrite the operator's screen or hide a line. Control characters (C0, DEL and C1) and
/// backslashes are shown as `\xNN`-style escapes; everything else is left as it is.
package enum TerminalText {
    /// The longest start of `text` that is at most `bytes` bytes of UTF-8, whole characters
    /// only: a bound that holds whatever the text's script.
    package static func prefix(_ text: String, bytes: Int) -> String {
        var count = 0
        var end = text.startIndex
        for character in text {
            count += character.utf8.count
            guard count <= bytes else { break }
            end = text.index(after: end)
        }
        return String(text[..<end])
    }

    package static func escape(_ text: String) -> String {
        var result = ""
        result.reserveCapacity(text.utf8.count)
        for scalar in text.unicodeScalars {
            switch scalar.value {
            case 0x5c:
                result += "\\\\"
            case 0x00..<0x20, 0x7f, 0x80..<0xa0:
                result += "\\x" + (scalar.value < 0x10 ? "0" : "") + String(scalar.value, radix: 16)
            default:
                result.unicodeScalars.append(scalar)
            }
        }
        return result
    }

    /// JSON text with DEL and the C1 controls (U+007F ... U+009F) written as `\u00XX`: still the
    /// same JSON, but a terminal that shows it acts on none of them (JSONEncoder escapes only C0).
    package static func escapeJSON(_ json: String) -> String {
        var result = ""
        result.reserveCapacity(json.utf8.count)
        for scalar in json.unicodeScalars {
            if (0x7f...0x9f).contains(scalar.value) {
                result += "\\u00" + String(scalar.value, radix: 16)
            } else {
                result.unicodeScalars.append(scalar)
            }
        }
        return result
    }
}
