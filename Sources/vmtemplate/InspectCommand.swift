import ArgumentParser
import Foundation
import VMTemplateKit
import VMTemplateOS
import VMTemplateQEMU
import VMTemplateStore

struct Inspect: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Show one template or clone in full.")

    @Argument(help: "A template name, or a clone ID (or unambiguous prefix) or name.")
    var reference: String

    @Flag(help: "Print one JSON object.")
    var json = false

    @OptionGroup var store: StoreOptions

    struct TemplateView: Encodable {
        var kind = "template"
        var template: TemplateManifest
        var clones: [String]
    }

    struct CloneView: Encodable {
        var kind = "clone"
        var clone: CloneStatus
        var record: CloneRecord
    }

    func run() async throws {
        try await reportingErrors {
            let store = try store.open(.readOnly)
            let records = store.clones().records
            if let name = try? EntityName(reference), store.templateExists(name) {
                let view = TemplateView(template: try store.template(named: name).manifest, clones: records.filter { $0.template == reference }.map(\.id))
                if json { return try Terminal.printJSON(view) }
                print(TerminalText.escapeJSON(String(decoding: try JSONCoding.encode(view), as: UTF8.self)), terminator: "")
                return
            }
            let record = try store.findClone(reference)
            let view = CloneView(clone: await CloneEngine(store: store).status(of: record), record: record)
            if json { return try Terminal.printJSON(view) }
            print(TerminalText.escapeJSON(String(decoding: try JSONCoding.encode(view), as: UTF8.self)), terminator: "")
        }
    }
}
