import Foundation
import Logging
import VMTemplateOS

/// The one log format of `vmtemplate serve`: every line, the API's access log and the pools',
/// scheduler's and watcher's lines alike, goes through this handler to stderr, as text
/// (`TIME LEVEL MESSAGE key=value...`) or as one JSON object per line (`--log-format json`).
/// Messages and values are escaped and bounded: paths and names in them come from callers and
/// records.
package struct ServeLogHandler: LogHandler {
    package enum Format: String, Sendable, CaseIterable {
        case text, json
    }

    package var logLevel: Logger.Level = .info
    package var metadata: Logger.Metadata = [:]
    let format: Format
    let write: @Sendable (String) -> Void

    package init(format: Format, write: @escaping @Sendable (String) -> Void = ServeLogHandler.standardError) {
        self.format = format
        self.write = write
    }

    package static let standardError: @Sendable (String) -> Void = { line in
        FileHandle.standardError.write(Data((line + "\n").utf8))
    }

    package subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    /// Hummingbird's name for the request ID, shown as `request_id`.
    static let requestIDKey = "hb.request.id"

    package func log(level: Logger.Level, message: Logger.Message, metadata explicit: Logger.Metadata?, source: String, file: String, function: String, line: UInt) {
        var fields = metadata.merging(explicit ?? [:]) { _, new in new }
        if let id = fields.removeValue(forKey: Self.requestIDKey), fields["request_id"] == nil { fields["request_id"] = id }
        let time = Self.timestamp(Date())
        let text = TerminalText.prefix(TerminalText.escape(message.description), bytes: 2048)
        switch format {
        case .text:
            let pairs = fields.sorted { $0.key < $1.key }.map { "\($0.key)=\(TerminalText.prefix(TerminalText.escape("\($0.value)"), bytes: 256))" }
            write(([time, level.rawValue, text] + pairs).joined(separator: " "))
        case .json:
            var object: [String: String] = ["time": time, "level": level.rawValue, "message": text]
            for (key, value) in fields { object[key] = TerminalText.prefix("\(value)", bytes: 256) }
            if let data = try? JSONSerialization.data(withJSONObject: object, options: [.sortedKeys, .withoutEscapingSlashes]) {
                write(String(decoding: data, as: UTF8.self))
            }
        }
    }

    /// RFC 3339 UTC with milliseconds.
    static func timestamp(_ date: Date) -> String {
        let milliseconds = Int((date.timeIntervalSince1970 * 1000).rounded(.down))
        let seconds = Date(timeIntervalSince1970: Double(milliseconds / 1000))
        var text = ISO8601DateFormatter().string(from: seconds)
        text.removeLast()
        return text + String(format: ".%03dZ", milliseconds % 1000)
    }
}
