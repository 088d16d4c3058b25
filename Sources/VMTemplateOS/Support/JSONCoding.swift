import Foundation

/// The JSON conventions of everything vmtemplate writes: sorted keys (stable diffs and digests),
/// ISO 8601 dates, snake_case keys spelled out in each type's `CodingKeys`.
public enum JSONCoding {
    public static func encoder(pretty: Bool = true) -> JSONEncoder {
        let encoder = JSONEncoder()
        encoder.outputFormatting = pretty ? [.sortedKeys, .prettyPrinted, .withoutEscapingSlashes] : [.sortedKeys, .withoutEscapingSlashes]
        encoder.dateEncodingStrategy = .iso8601
        return encoder
    }

    public static func decoder() -> JSONDecoder {
        let decoder = JSONDecoder()
        decoder.dateDecodingStrategy = .iso8601
        return decoder
    }

    /// `value` as JSON, absent values as `null` (``JSONTree``).
    public static func encode(_ value: some Encodable, pretty: Bool = true) throws -> Data {
        var data = try encoder(pretty: pretty).encode(JSONTree.of(value))
        data.append(0x0a)
        return data
    }

    /// A single-line rendering, for `--json` output and JSON-lines logs.
    public static func line(_ value: some Encodable) throws -> String {
        String(decoding: try encoder(pretty: false).encode(JSONTree.of(value)), as: UTF8.self)
    }
}

/// Short, human descriptions of `DecodingError`s (the default ones are long debug dumps).
package enum JSONErrorText {
    package static func describe(_ error: any Error) -> String {
        guard let error = error as? DecodingError else { return "\(error)" }
        func path(_ context: DecodingError.Context) -> String {
            let keys = context.codingPath.map { $0.intValue.map { "[\($0)]" } ?? $0.stringValue }
            return keys.isEmpty ? "the top level" : "'\(keys.joined(separator: "."))'"
        }
        switch error {
        case .keyNotFound(let key, let context):
            return "missing key '\(key.stringValue)' in \(path(context))"
        case .typeMismatch(_, let context), .valueNotFound(_, let context):
            return "wrong type at \(path(context)): \(context.debugDescription)"
        case .dataCorrupted(let context):
            return "malformed JSON at \(path(context)): \(context.underlyingError.map { "\($0)" } ?? context.debugDescription)"
        @unknown default:
            return "\(error)"
        }
    }
}
