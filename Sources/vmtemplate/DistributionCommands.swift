import ArgumentParser
import Foundation
import VMTemplateDistribution
import VMTemplateKit
import VMTemplateOS
import VMTemplateStore

/// How `push` and `pull` reach a registry.
struct RegistryArguments: ParsableArguments {
    @Flag(help: "Speak plain HTTP (a registry without TLS); loopback registries are always reached so.")
    var plainHTTP = false

    @Option(help: ArgumentHelp("A PEM file of the CA that signed the registry's certificate (default: the system's CAs).", valueName: "path"))
    var caFile: String?

    @Option(help: ArgumentHelp("A config.json or auth.json to take the registry's credentials from (default: $REGISTRY_AUTH_FILE, $XDG_RUNTIME_DIR/containers/auth.json, ~/.docker/config.json).", valueName: "path"))
    var credsFile: String?

    var options: RegistryOptions {
        var options = RegistryOptions()
        options.plainHTTP = plainHTTP
        options.caFile = caFile
        options.credentialsFile = credsFile
        return options
    }
}

struct Push: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "push",
        abstract: "Push a template to an OCI registry; print the digest to pull it by.",
        discussion: """
            The template travels as one OCI artifact (docs/distribution.md): its portable manifest \
            as the config, its files in 32 MiB chunks compressed with zstd, chunks of zeros left \
            out. Chunks the registry has already are not sent again.

            Example: vmtemplate push busybox 127.0.0.1:5000/templates/busybox:v1
            """
    )

    @Argument(help: "Template to push.", completion: NameCompletion.templates)
    var template: String

    @Argument(help: "HOST[:PORT]/REPOSITORY:TAG.")
    var reference: String

    @OptionGroup var registry: RegistryArguments

    @Flag(help: "Print the result as one JSON object.")
    var json = false

    @OptionGroup var store: StoreOptions

    func run() async throws {
        try await reportingErrors {
            let name = try EntityName(template)
            let target = try ImageReference(parsing: reference)
            let distribution = TemplateDistribution(store: try store.open(.readOnly))
            let registry = self.registry
            try Self.report(try await distribution.push(name, to: target, options: registry.options), json: json)
        }
    }

    /// What push and export print: the manifest's digest (what a pull names), or the result.
    static func report(_ result: PackResult, json: Bool) throws {
        if json { return try Terminal.printJSON(result) }
        print(result.digest)
    }
}

struct Pull: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "pull",
        abstract: "Pull a template from an OCI registry, verified, and publish it.",
        discussion: """
            Pull by digest (HOST/REPOSITORY@sha256:…, what push printed): a tag can be moved. The \
            config comes first, and a template this node's QEMU cannot run is refused before any \
            chunk is downloaded; every chunk is checked against its digest as it arrives, every \
            file against the config's digests before the template is published at once. An \
            interrupted pull leaves only verified chunks, which the next pull does not fetch again.

            Example: vmtemplate pull 127.0.0.1:5000/templates/busybox@sha256:… --name busybox
            """
    )

    @Argument(help: "HOST[:PORT]/REPOSITORY@sha256:DIGEST (or :TAG).")
    var reference: String

    @Option(help: ArgumentHelp("The template's name here (default: its name where it was made).", valueName: "name"))
    var name: String?

    @OptionGroup var registry: RegistryArguments

    @Flag(help: "Print the result as one JSON object.")
    var json = false

    @OptionGroup var qemu: QEMUOptions
    @OptionGroup var store: StoreOptions

    func run() async throws {
        try await reportingErrors {
            let source = try ImageReference(parsing: reference)
            let wanted = try name.map { try EntityName($0) }
            let distribution = TemplateDistribution(store: try store.open(), explicitQEMU: qemu.explicitPath)
            let registry = self.registry
            try await interruptible {
                let result = try await distribution.pull(source, name: wanted, options: registry.options)
                try Self.report(result, json: json)
            }
        }
    }

    static func report(_ result: ReceiveResult, json: Bool) throws {
        if json { return try Terminal.printJSON(result) }
        let how = result.existed ? "already here" : "\(result.fetchedChunks) chunks fetched (\(ByteSize(bytes: result.fetchedBytes))), \(result.reusedChunks) reused" + (result.localChunks > 0 ? ", \(result.localChunks) from templates here" : "")
        print(TerminalText.escape("template \(result.template) \(result.digest): \(how)"))
    }
}

struct Export: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "export",
        abstract: "Write a template into an OCI image layout (a directory or a tar file), for a node without a registry.",
        discussion: """
            The same artifact push sends (docs/distribution.md), in an OCI image layout: \
            oci-layout, index.json and blobs/sha256/. A PATH ending in .tar is written as one \
            tar file (skopeo's oci-archive), never over an existing file; any other PATH is a \
            directory. Any OCI tool reads either (skopeo, oras); 'vmtemplate import' publishes it.

            Example: vmtemplate export busybox /srv/transfer/busybox.tar
            """
    )

    @Argument(help: "Template to export.", completion: NameCompletion.templates)
    var template: String

    @Argument(help: "A new tar file (PATH.tar), or the layout's directory (made if it does not exist; it may hold other images).")
    var path: String

    @Option(help: ArgumentHelp("The name the image gets in the layout (default: the template's).", valueName: "tag"))
    var tag: String?

    @Flag(help: "Print the result as one JSON object.")
    var json = false

    @OptionGroup var store: StoreOptions

    func run() async throws {
        try await reportingErrors {
            let name = try EntityName(template)
            try Push.report(try await TemplateDistribution(store: try store.open(.readOnly)).export(name, to: path, tag: tag), json: json)
        }
    }
}

struct Import: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "import",
        abstract: "Publish the template of an OCI image layout (a directory or a tar file), verified.",
        discussion: """
            Checked as 'pull' checks what a registry sends; a tar file is read in place, never \
            extracted. --image names the image when the layout holds several (its tag, or \
            sha256:…).

            Example: vmtemplate import /srv/transfer/busybox.tar --name busybox
            """
    )

    @Argument(help: "The layout: its directory, or a tar file of it.")
    var path: String

    @Option(help: ArgumentHelp("The image in the layout: its tag or digest (needed when it holds several).", valueName: "tag-or-digest"))
    var image: String?

    @Option(help: ArgumentHelp("The template's name here (default: its name where it was made).", valueName: "name"))
    var name: String?

    @Flag(help: "Print the result as one JSON object.")
    var json = false

    @OptionGroup var qemu: QEMUOptions
    @OptionGroup var store: StoreOptions

    func run() async throws {
        try await reportingErrors {
            let wanted = try name.map { try EntityName($0) }
            let distribution = TemplateDistribution(store: try store.open(), explicitQEMU: qemu.explicitPath)
            let (path, image, json) = (self.path, self.image, self.json)
            try await interruptible {
                let result = try await distribution.importLayout(path, image: image, name: wanted)
                try Pull.report(result, json: json)
            }
        }
    }
}
